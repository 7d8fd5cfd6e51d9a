"""One forward of several right-padded batches gives each batch the states of its own forward."""

import torch

from lit_safety import backbone
from lit_safety.adversaries import LatentAdversary, ResidualAttack
from lit_safety.representations import forward_states, joint_forward_states


def _model(tiny_model_dir):
    return backbone.load_causal_lm(tiny_model_dir, "float32", None).eval()


def _batch(lengths, seed):
    generator = torch.Generator().manual_seed(seed)
    length = max(lengths)
    ids = torch.randint(1, 15, (len(lengths), length), generator=generator)
    mask = torch.arange(length)[None] < torch.tensor(lengths)[:, None]
    return {"input_ids": ids * mask, "attention_mask": mask.long()}


def test_joint_forward_equals_separate_forwards(tiny_model_dir):
    model = _model(tiny_model_dir)
    first, second = _batch([5, 3], seed=0), _batch([7, 7, 2], seed=1)  # other lengths: one is padded further
    with torch.no_grad():
        joined = joint_forward_states(model, [first, second], [1, 3], logits=True)
        for seq, (states, logits) in zip([first, second], joined):
            alone, alone_logits = forward_states(model, seq["input_ids"], seq["attention_mask"], [1, 3])
            real = seq["attention_mask"].bool()
            assert states[1].shape == alone[1].shape and logits.shape == alone_logits.shape
            for layer in (1, 3):
                assert torch.allclose(states[layer][real], alone[layer][real], atol=1e-5)
            assert torch.allclose(logits[real], alone_logits[real], atol=1e-5)


def test_a_miner_on_some_rows_leaves_the_others_clean(tiny_model_dir):
    model = _model(tiny_model_dir)
    seq = _batch([4, 4, 4], seed=2)
    miner = ResidualAttack.for_model(model, 0)
    with torch.no_grad():
        miner.weight.normal_()
        clean, _ = forward_states(model, seq["input_ids"], seq["attention_mask"], [2], logits=False)
        with miner.attached(model, rows=1):
            some, _ = forward_states(model, seq["input_ids"], seq["attention_mask"], [2], logits=False)
        with miner.attached(model):
            every, _ = forward_states(model, seq["input_ids"], seq["attention_mask"], [2], logits=False)
    assert torch.allclose(some[2][:1], every[2][:1]) and not torch.allclose(some[2][:1], clean[2][:1])
    assert torch.allclose(some[2][1:], clean[2][1:])


def test_a_perturbation_reaches_every_part_of_a_joint_batch(tiny_model_dir):
    model = _model(tiny_model_dir)
    first, second = _batch([4, 4], seed=3), _batch([4, 4], seed=4)
    adversary = LatentAdversary(model, [1], torch.ones(2, 4, dtype=torch.bool), 1.0)
    with torch.no_grad():
        adversary.units[1].normal_()
        with adversary.attached():
            joined = joint_forward_states(model, [first, second], [2])
            alone = [forward_states(model, s["input_ids"], s["attention_mask"], [2], logits=False)[0] for s in (first, second)]
    for (states, _), single in zip(joined, alone):
        assert torch.allclose(states[2], single[2], atol=1e-5)
