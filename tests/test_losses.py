"""Every loss against values computed by hand on small tensors."""

import math

import pytest
import torch

from lit_safety.losses import (
    away,
    distance,
    kl_divergence,
    reroute_loss,
    retain_loss,
    token_logprobs,
    toward,
    triplet_loss,
)


def uniform_logits(batch, length, vocab):
    return torch.zeros(batch, length, vocab)


def test_toward_is_masked_token_nll():
    # Position t predicts token t+1. With logits favouring token 1 by log(3) over 2 others: p(1) = 3/5.
    logits = torch.zeros(1, 3, 3)
    logits[..., 1] = math.log(3)
    ids = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[False, True, True]])  # targets: token 1 (p 3/5) and token 2 (p 1/5)
    expected = -(math.log(3 / 5) + math.log(1 / 5)) / 2
    assert toward(logits, ids, mask).item() == pytest.approx(expected, rel=1e-6)
    only_last = torch.tensor([[False, False, True]])
    assert toward(logits, ids, only_last).item() == pytest.approx(-math.log(1 / 5), rel=1e-6)


def test_away_is_unlikelihood():
    logits = torch.zeros(1, 2, 4)  # uniform: p = 1/4 for every token
    ids = torch.tensor([[0, 3]])
    mask = torch.tensor([[False, True]])
    assert away(logits, ids, mask).item() == pytest.approx(-math.log(1 - 0.25), rel=1e-6)
    assert token_logprobs(logits, ids).shape == (1, 1)


def test_kl_divergence_with_temperature():
    # A prediction loss: the mask marks token 1, predicted at position 0; position 1 predicts past
    # the end and must not count.
    ref = torch.tensor([[[math.log(3.0) * 2, 0.0], [9.0, 0.0]]])  # at T=2: softmax(log 3, 0) = (3/4, 1/4)
    new = torch.zeros(1, 2, 2)  # uniform
    expected = 4 * (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))
    mask = torch.tensor([[False, True]])
    assert kl_divergence(ref, new, mask, temperature=2.0).item() == pytest.approx(expected, rel=1e-5)
    assert kl_divergence(ref, ref, mask).item() == pytest.approx(0.0, abs=1e-7)


def test_distances_by_hand():
    x = torch.tensor([[3.0, 4.0]])
    y = torch.tensor([[0.0, 4.0]])
    cos = 16 / (5 * 4)
    assert distance(x, y, "l2").item() == pytest.approx(3.0)
    assert distance(x, y, "cosine").item() == pytest.approx(1 - cos)
    assert distance(x, y, "mix", mix_weight=10.0).item() == pytest.approx(3.0 + 10 * (1 - cos))
    # mix clips negative cosine at 0: opposite vectors cost the full weight, not twice it.
    assert distance(x, -x, "mix", mix_weight=2.0).item() == pytest.approx(10.0 + 2.0)
    with pytest.raises(ValueError, match="unknown distance 'l1'"):
        distance(x, y, "l1")


def test_triplet_loss_masks_tokens_and_relu_zero_region():
    anchor = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])  # [B=1, T=3, D=2]
    positive = torch.zeros(1, 3, 2)
    negative = torch.tensor([3.0, 0.0])  # broadcast, like the harmful mean
    mask = torch.tensor([[True, True, False]])  # the third token must not count
    # token 0: d_p = 1, d_n = 2 -> ReLU(1 - 2 + 0.5) = 0 (zero region)
    # token 1: d_p = 2, d_n = sqrt(13) -> ReLU(2 - 3.6056 + 2.0) = 0.3944
    margin = 0.5
    loss = triplet_loss(anchor, positive, negative, mask, margin, "l2", "l2")
    assert loss.item() == pytest.approx((0.0 + max(0.0, 2 - math.sqrt(13) + margin)) / 2, abs=1e-6)
    loss = triplet_loss(anchor, positive, negative, mask, 2.0, "l2", "l2")
    assert loss.item() == pytest.approx(((1 - 2 + 2.0) + (2 - math.sqrt(13) + 2.0)) / 2, rel=1e-6)


def test_triplet_gradient_is_zero_in_the_relu_zero_region():
    anchor = torch.tensor([[[0.1, 0.0]]], requires_grad=True)
    loss = triplet_loss(anchor, torch.zeros(2), torch.tensor([5.0, 0.0]), torch.ones(1, 1, dtype=torch.bool), 1.0, "l2", "l2")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(anchor.grad, torch.zeros_like(anchor))


def test_circuit_breaker_losses_by_hand():
    states = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [7.0, 7.0]]])
    reference = torch.tensor([[[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    mask = torch.tensor([[True, True, False]])
    assert retain_loss(states, reference, mask).item() == pytest.approx((5.0 + math.sqrt(2)) / 2)
    aligned = torch.tensor([[[1.0, 1.0], [-1.0, 0.0]]])
    ref = torch.tensor([[[2.0, 2.0], [1.0, 0.0]]])
    # token 0: cos = 1; token 1: cos = -1, clipped to 0 by the ReLU
    assert reroute_loss(aligned, ref, torch.ones(1, 2, dtype=torch.bool)).item() == pytest.approx(0.5)


def test_global_masked_mean_is_the_masked_mean_on_one_process():
    from lit_safety.distributed import global_masked_mean, mean_across_ranks_

    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]], requires_grad=True)
    mask = torch.tensor([[True, False], [True, True]])
    mean = global_masked_mean(x, mask)
    assert torch.allclose(mean, torch.tensor([13.0 / 3, 16.0 / 3]))  # rows 0, 2, 3 by hand
    mean.sum().backward()
    assert torch.allclose(x.grad[..., 0], mask.float() / 3)  # the gradient reaches the marked states only
    t = torch.tensor([2.0])
    assert mean_across_ranks_([t])[0] is t and t.item() == 2.0


@pytest.mark.parametrize("world, rows, fraction", [(1, 8, 0.3), (2, 4, 0.3), (2, 2, 0.25), (4, 2, 0.3), (8, 2, 0.3)])
def test_leading_rows_mine_what_one_process_mines(monkeypatch, world, rows, fraction):
    from lit_safety import distributed

    wanted = round(fraction * rows * world)  # one process with every rank's rows mines its first `wanted`
    mined = []
    for r in range(world):
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        count = distributed.leading_rows(fraction, rows)
        mined += [i * world + r for i in range(count)]  # rank r's row i is global row i * world + r
    assert sorted(mined) == list(range(wanted))


def test_losses_keep_float64_and_widen_half_precision():
    from lit_safety.losses import distance, toward

    for dtype, wide in [(torch.float64, torch.float64), (torch.bfloat16, torch.float32)]:
        x, y = torch.ones(1, 2, 3, dtype=dtype), torch.zeros(1, 2, 3, dtype=dtype)
        assert distance(x, y, "mix").dtype == wide
        logits, ids = torch.zeros(1, 3, 4, dtype=dtype), torch.tensor([[0, 1, 2]])
        assert toward(logits, ids, torch.ones(1, 3, dtype=torch.bool)).dtype == wide
