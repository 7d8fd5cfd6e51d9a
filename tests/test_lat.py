import math

import pytest
import torch

from lit_safety import SafetyDataModule, TargetedLATModule, backbone
from lit_safety.adversaries import LatentAdversary, project_per_token
from lit_safety.losses import dpo_loss, rmu_forget_loss, rmu_retain_loss, sequence_logprob, toward
from lit_safety.methods import LATAdversary
from lit_safety.methods.lat_objectives import DPO, RMU, GradientAscent, Refusal
from lit_safety.representations import forward_states


def test_projection_keeps_each_token_in_the_ball_and_masked_positions_at_zero():
    delta = torch.tensor([[[3.0, 4.0], [0.3, 0.4], [1.0, 1.0]]])  # norms 5, 0.5, 1.41
    mask = torch.tensor([[True, True, False]])
    out = project_per_token(delta, 1.0, mask)
    assert torch.allclose(out[0, 0], torch.tensor([0.6, 0.8]))  # scaled onto the sphere
    assert torch.equal(out[0, 1], delta[0, 1])  # already inside: unchanged
    assert torch.equal(out[0, 2], torch.zeros(2))  # outside the mask: zero
    random = project_per_token(torch.randn(4, 7, 16) * 10, 2.5, torch.rand(4, 7) > 0.5)
    assert (random.norm(dim=-1) <= 2.5 + 1e-5).all()


def test_dpo_loss_by_hand():
    chosen, rejected = torch.tensor([-1.0]), torch.tensor([-3.0])
    ref_chosen, ref_rejected = torch.tensor([-2.0]), torch.tensor([-2.0])
    # margin = (-1 + 2) - (-3 + 2) = 2 -> -log sigmoid(0.3 * 2)
    expected = -math.log(1 / (1 + math.exp(-0.6)))
    assert dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.3).item() == pytest.approx(expected, rel=1e-6)
    assert dpo_loss(ref_chosen, ref_rejected, ref_chosen, ref_rejected).item() == pytest.approx(math.log(2))


def test_rmu_losses_by_hand():
    states = torch.tensor([[[1.0, 3.0], [5.0, 5.0]]])
    control = torch.tensor([1.0, 1.0])
    mask = torch.tensor([[True, False]])
    assert rmu_forget_loss(states, control, mask).item() == pytest.approx((0 + 4) / 2)  # ||(0, 2)||^2 / D
    assert rmu_retain_loss(states, torch.zeros_like(states), mask).item() == pytest.approx((1 + 9) / 2)


def test_sequence_logprob_sums_masked_targets():
    logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens
    ids = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[False, True, True]])
    assert sequence_logprob(logits, ids, mask).item() == pytest.approx(2 * math.log(0.25))


@pytest.fixture
def batch():
    data = SafetyDataModule(batch_size=4, val_fraction=0.0, tokenizer="organism")
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_inner_loop_lowers_the_adversary_objective_without_touching_lora(batch):
    model = backbone.add_lora(backbone.load_causal_lm("organism"))
    harmful = batch["harmful"]["completion"]
    adversary = LatentAdversary(model, ["embedding", 0], harmful["prompt_mask"], epsilon=2.0)

    def objective():
        logits = model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"]).logits
        return toward(logits, harmful["input_ids"], harmful["completion_mask"])

    with adversary.attached():
        losses = adversary.optimise(objective, steps=10, lr=0.05)
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in model.parameters())
    for name, delta in ((n, adversary.delta(n)) for n in adversary.units):
        norms = delta.norm(dim=-1)
        assert (norms <= 2.0 + 1e-5).all(), name
        assert (norms[~harmful["prompt_mask"]] == 0).all()  # only prompt positions are perturbed
        assert (norms[harmful["prompt_mask"]] > 0).any()
    assert not any(layer._forward_hooks for layer in backbone.decoder_layers(model))
    assert not model.get_input_embeddings()._forward_hooks


OBJECTIVES = {"refusal": Refusal, "dpo": DPO, "rmu": lambda: RMU(layer=1), "gradient_ascent": GradientAscent}


def calibrated(module, batch):
    module.configure_model()
    module.calibration = module.calibrate(batch)
    return module


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_trains_only_lora_and_keeps_the_adversary_out_of_the_checkpoint(batch, objective):
    module = calibrated(TargetedLATModule(objective=OBJECTIVES[objective](),
                                          adversary=LATAdversary(layers=["embedding", 1], steps=6)), batch)
    module.train()
    terms = module.compute_losses(batch)
    terms["loss"].backward()
    assert terms["adversary/loss_last"] < terms["adversary/loss_first"]
    with_grad = {n for n, p in module.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert all("lora_" in k for k in module.state_dict())
    assert {"adversary/norm_embedding", "adversary/norm_1", "loss_attacked", "loss_benign"} <= set(terms)


def test_unknown_attack_site_is_a_clear_error():
    module = TargetedLATModule(adversary=LATAdversary(layers=["embeddings"]))
    with pytest.raises(ValueError, match="unknown attack site 'embeddings'"):
        module.configure_model()


def test_kl_retain_term_is_zero_at_the_reference_and_the_benign_completions_kl_once_moved(batch):
    module = calibrated(TargetedLATModule(adversary=LATAdversary(layers=[0], steps=1), kl_weight=2.0,
                                          temperature=1.5), batch)
    module.train()
    terms = module.compute_losses(batch)
    assert terms["loss_kl"] == 0  # fresh adapters: the model is its reference
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    terms = module.compute_losses(batch)
    benign = batch["benign"]["completion"]
    logits = module.model(input_ids=benign["input_ids"], attention_mask=benign["attention_mask"]).logits
    with module.reference():
        reference = module.model(input_ids=benign["input_ids"], attention_mask=benign["attention_mask"]).logits
    log_p_ref, log_p = (torch.log_softmax(z[:, :-1] / 1.5, -1) for z in (reference, logits))
    per_token = (log_p_ref.exp() * (log_p_ref - log_p)).sum(-1)[benign["completion_mask"][:, 1:]]
    assert terms["loss_kl"] > 0
    torch.testing.assert_close(terms["loss_kl"], 1.5**2 * per_token.mean())
    torch.testing.assert_close(terms["loss"], terms["loss_attacked"] + terms["loss_benign"] + 2.0 * terms["loss_kl"])


@pytest.mark.parametrize("bad", [{"kl_weight": -1.0}, {"temperature": 0.0}, {"benign_weight": -0.5}])
def test_negative_retain_weights_or_temperature_are_refused(bad):
    with pytest.raises(ValueError, match="benign_weight and kl_weight must be >= 0 and temperature > 0"):
        TargetedLATModule(**bad)


@pytest.mark.parametrize("model_toward", [0.0, 0.5])
def test_dpo_objective_is_dpo_plus_toward_refusal(batch, model_toward):
    # Without an adversary step the attacked loss is the model's DPO loss against the adapters-off
    # reference, plus model_toward x toward(refusal) (which keeps the chosen answer from degrading).
    module = TargetedLATModule(objective=DPO(model_toward=model_toward), adversary=LATAdversary(layers=[1], steps=0))
    calibrated(module, batch)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:  # move away from the reference so the DPO margin is not zero
                p.normal_(0, 0.5)
    module.eval()
    harmful, refusal = batch["harmful"]["completion"], batch["harmful"]["refusal"]

    def logp(seq):
        logits = module.model(input_ids=seq["input_ids"], attention_mask=seq["attention_mask"]).logits
        return sequence_logprob(logits, seq["input_ids"], seq["completion_mask"]), logits

    with torch.no_grad():
        (chosen, refusal_logits), (rejected, _) = logp(refusal), logp(harmful)
        with backbone.reference(module.model):
            (ref_chosen, _), (ref_rejected, _) = logp(refusal), logp(harmful)
        expected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.3) + model_toward * toward(
            refusal_logits, refusal["input_ids"], refusal["completion_mask"])
        terms = module.compute_losses(batch)
    assert terms["loss_attacked"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("positions", ["all", "completion"])
def test_rmu_steers_only_the_chosen_positions(batch, positions):
    module = calibrated(TargetedLATModule(objective=RMU(layer=1, positions=positions),
                                          adversary=LATAdversary(layers=[0], steps=0)), batch)
    module.eval()
    terms = module.compute_losses(batch)
    harmful = batch["harmful"]["completion"]
    with torch.no_grad():
        states = forward_states(module.model, harmful["input_ids"], harmful["attention_mask"], [1], logits=False)[0][1]
    mask = harmful["attention_mask"] if positions == "all" else harmful["completion_mask"]
    expected = rmu_forget_loss(states, module.calibration["rmu_control"], mask)
    assert terms["loss_attacked"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_sparse_adversary_perturbs_k_positions_inside_the_mask():
    from lit_safety.methods.targeted_lat import sample_positions

    torch.manual_seed(0)
    mask = torch.tensor([[True, True, True, True, False], [False, True, False, False, False]])
    draws = [sample_positions(mask, 2) for _ in range(20)]
    for kept in draws:
        assert kept[0].sum() == 2 and kept[1].sum() == 1  # a row with fewer positions keeps all it has
        assert not (kept & ~mask).any()
    assert len({tuple(k[0].tolist()) for k in draws}) > 1  # redrawn each time
    with pytest.raises(ValueError, match="adversary tokens must be >= 1"):
        LATAdversary(tokens=0)


def test_adversary_positions_all_covers_prompts_and_both_responses(batch):
    module = TargetedLATModule(adversary=LATAdversary(layers=[0], positions="all"))
    harmful, refusal = batch["harmful"]["completion"], batch["harmful"]["refusal"]
    mask = module._adversary_mask(batch)
    width = mask.shape[1]
    pad = lambda m: torch.nn.functional.pad(m, (0, width - m.shape[1]))  # noqa: E731
    assert torch.equal(mask, pad(harmful["attention_mask"]) | pad(refusal["attention_mask"]))
    prompt_only = TargetedLATModule(adversary=LATAdversary(layers=[0]))._adversary_mask(batch)
    assert torch.equal(prompt_only, pad(harmful["prompt_mask"]))


def test_calibration_comes_from_the_first_training_batch_not_validation(tmp_path):
    import lightning as L

    module = TargetedLATModule(adversary=LATAdversary(layers=[0], steps=1))
    data = SafetyDataModule(batch_size=4, val_fraction=0.25)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=2, val_check_interval=1)
    trainer.fit(module, data)
    first = next(iter(data.train_dataloader()))
    expected = module.calibrate(first)
    assert module.calibration.keys() == expected.keys()
    assert all(torch.allclose(module.calibration[k], expected[k]) for k in expected)


def test_a_non_finite_inner_step_is_dropped_counted_and_does_not_poison_the_update(batch):
    module = calibrated(TargetedLATModule(adversary=LATAdversary(layers=[0], steps=4)), batch)
    module.train()
    losses, calls = module.objective.losses, {"n": 0}

    def poisoned(module_, batch_):
        adversary, attacked = losses(module_, batch_)

        def sometimes_nan():
            calls["n"] += 1
            loss = adversary()
            return loss * float("nan") if calls["n"] == 2 else loss

        return sometimes_nan, attacked

    module.objective.losses = poisoned
    terms = module.compute_losses(batch)
    assert terms["adversary/dropped_steps"].item() == 1
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def test_adam_descent_drops_only_the_bad_step():
    from lit_safety.adversaries import adam_descent, dropped

    x = torch.ones(3, requires_grad=True)
    step = {"n": 0}

    def loss():
        step["n"] += 1
        value = (x ** 2).sum()
        return value / 0.0 * 0.0 if step["n"] == 3 else value  # NaN at the third step

    history = adam_descent([x], loss, steps=6, lr=0.1)
    assert dropped(history) == 1 and history[2] != history[2]
    assert torch.isfinite(x).all() and history[-1] < history[0]


def test_completion_window_scores_like_the_full_logits(tiny_model_dir):
    # The objectives' losses read logits only from the position before the earliest completion token.
    from lit_safety import backbone
    from lit_safety.losses import sequence_logprob, toward
    from lit_safety.representations import completion_window, joint_completion_windows

    model = backbone.load_causal_lm(tiny_model_dir, "float32", None).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7, 0], [3, 4, 5, 6, 7, 8]])
    seq = {"input_ids": ids, "attention_mask": (ids > 0).long(),
           "completion_mask": torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]]).bool()}
    other = {k: v[:, :5] for k, v in seq.items()}
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=seq["attention_mask"]).logits
        assert completion_window(model, seq).logits.shape[1] == 5  # from position 1, before the first completion token
        assert torch.allclose(toward(*completion_window(model, seq)), toward(full, ids, seq["completion_mask"]), atol=1e-5)
        first, second = joint_completion_windows(model, seq, other)
        assert torch.allclose(sequence_logprob(*first), sequence_logprob(full, ids, seq["completion_mask"]), atol=1e-5)
        short = model(input_ids=other["input_ids"], attention_mask=other["attention_mask"]).logits
        assert torch.allclose(sequence_logprob(*second), sequence_logprob(short, other["input_ids"],
                                                                           other["completion_mask"]), atol=1e-5)


def test_suffix_adversary_perturbs_only_soft_slots_at_the_end_of_every_harmful_request(batch):
    module = calibrated(TargetedLATModule(adversary=LATAdversary(
        layers=["embedding"], epsilon=3.0, epsilon_scale="reference_norm", steps=6, positions="suffix",
        suffix_length=3, suffix_init="please")), batch)
    module.train()
    seen = {}
    original = module.objective.losses

    def losses(mod, slotted):
        seen["batch"] = slotted
        return original(mod, slotted)

    module.objective.losses = losses
    terms = module.compute_losses(batch)
    terms["loss"].backward()
    assert terms["adversary/loss_last"] < terms["adversary/loss_first"]
    assert all("lora_" in n for n, p in module.named_parameters() if p.grad is not None)
    # Both sequences of a request get the same three "please" slots just before the user turn closes.
    tail, please = module._suffix_slot
    for name in ("completion", "refusal"):
        before, after = batch["harmful"][name], seen["batch"]["harmful"][name]
        assert (after["prompt_mask"].sum(-1) == before["prompt_mask"].sum(-1) + 3).all()
        end = after["prompt_mask"].sum(-1) - tail
        row = torch.arange(len(end))
        assert all((after["input_ids"][row, end - k] == please).all() for k in (1, 2, 3))
    # Half the benign requests carry the same slots, so a suffix is no cue to refuse.
    before, after = batch["benign"]["completion"], seen["batch"]["benign"]["completion"]
    added = (after["prompt_mask"].sum(-1) - before["prompt_mask"].sum(-1)).tolist()
    half = len(added) // 2
    assert added == [3] * half + [0] * (len(added) - half)
    radius = 3.0 * float(module.calibration["site_norm/embedding"])
    assert 0 < terms["adversary/norm_embedding"] <= radius * (1 + 1e-5)
    module.eval()
    seen.clear()
    module.compute_losses(batch)
    assert torch.equal(seen["batch"]["harmful"]["completion"]["input_ids"], batch["harmful"]["completion"]["input_ids"])


def test_a_list_of_suffix_lengths_gives_harmful_and_decoy_requests_one_length_per_step_in_turn(batch, monkeypatch):
    module = calibrated(TargetedLATModule(adversary=LATAdversary(
        layers=["embedding"], epsilon=3.0, epsilon_scale="reference_norm", steps=1, positions="suffix",
        suffix_length=[2, 4], suffix_init="please")), batch)
    module.train()
    for step, length in enumerate([2, 4, 2]):
        monkeypatch.setattr(TargetedLATModule, "global_step", property(lambda self, step=step: step))
        slotted, slots, _ = module._with_slots(batch)
        assert (slots.sum(-1) == length).all()
        for name in ("completion", "refusal"):
            added = slotted["harmful"][name]["prompt_mask"].sum(-1) - batch["harmful"][name]["prompt_mask"].sum(-1)
            assert (added == length).all()
        benign = slotted["benign"]["completion"]["prompt_mask"].sum(-1) - batch["benign"]["completion"]["prompt_mask"].sum(-1)
        assert benign.max() == length


def test_suffix_init_outside_the_vocabulary_is_a_one_line_error():
    module = TargetedLATModule(adversary=LATAdversary(layers=["embedding"], positions="suffix", suffix_init="zzqx"))
    with pytest.raises(ValueError, match="model.adversary.suffix_init: 'zzqx' is not in the tokenizer's vocabulary"):
        module.configure_model()


def test_prompt_layers_join_the_suffix_adversary_at_every_prompt_position_with_their_own_radius(batch):
    module = calibrated(TargetedLATModule(adversary=LATAdversary(
        layers=["embedding"], epsilon=3.0, steps=6, positions="suffix", suffix_length=3, suffix_init="please",
        prompt_layers=[1], prompt_epsilon=0.2)), batch)
    module.train()
    seen = {}
    original = LatentAdversary.freeze

    def freeze(adversary):
        seen["adversary"] = adversary
        original(adversary)

    LatentAdversary.freeze = freeze
    try:
        terms = module.compute_losses(batch)
    finally:
        LatentAdversary.freeze = original
    assert terms["adversary/loss_last"] < terms["adversary/loss_first"]
    adversary, slotted = seen["adversary"], module._with_slots(batch)[0]["harmful"]["completion"]
    prompt = torch.nn.functional.pad(slotted["prompt_mask"], (0, adversary.masks[1].shape[1] - slotted["prompt_mask"].shape[1]))
    slots = adversary.masks["embedding"]
    assert (slots.sum(-1) == 3).all() and torch.equal(adversary.masks[1], prompt)
    layer = adversary.delta(1).norm(dim=-1)
    assert (layer[~prompt] == 0).all() and (layer[prompt & ~slots] > 0).any()  # the request words too
    assert (layer <= 0.2 * float(module.calibration["site_norm/1"]) * (1 + 1e-5)).all()
    assert (adversary.delta("embedding").norm(dim=-1)[~slots] == 0).all()
    assert 0 < terms["adversary/norm_1"] and "adversary/norm_embedding" in terms


@pytest.mark.parametrize("adversary, message", [
    (dict(layers=[0], prompt_layers=[1]), "prompt_layers needs positions: suffix"),
    (dict(layers=["embedding"], positions="suffix", prompt_layers=[1], prompt_epsilon=0.0), "prompt_epsilon must be > 0"),
])
def test_bad_prompt_layers_settings_are_one_line_errors(adversary, message):
    with pytest.raises(ValueError, match=message):
        LATAdversary(**adversary)


def test_prompt_layers_naming_a_site_of_layers_again_is_a_one_line_error():
    module = TargetedLATModule(adversary=LATAdversary(layers=["embedding", 1], positions="suffix",
                                                      prompt_layers=[1 - backbone.num_decoder_layers("organism")]))
    with pytest.raises(ValueError, match="name one site twice"):
        module.configure_model()


def test_adversarial_decoys_carry_the_optimised_suffix_of_a_harmful_request_into_the_benign_retain_pass(batch):
    module = calibrated(TargetedLATModule(adversary=LATAdversary(
        layers=["embedding"], epsilon=3.0, steps=4, positions="suffix", suffix_length=3, suffix_init="please",
        prompt_layers=[1], decoys="adversarial")), batch)
    module.train()
    seen = {}
    original = module._retain_adversary

    def retain_adversary(benign, adversary, slots, decoy_slots):
        seen.update(adversary=adversary, slots=slots, decoy_slots=decoy_slots)
        seen["decoy"], terms = original(benign, adversary, slots, decoy_slots)
        return seen["decoy"], terms

    module._retain_adversary = retain_adversary
    terms = module.compute_losses(batch)
    terms["loss"].backward()
    assert all("lora_" in n for n, p in module.named_parameters() if p.grad is not None)
    harmful, slots, decoy_slots, decoy = seen["adversary"], seen["slots"], seen["decoy_slots"], seen["decoy"]
    assert decoy.sites == [("embedding", module.model.get_input_embeddings())]  # not the prompt site
    rows, decoys = slots.shape[0], int(decoy_slots.any(-1).sum())
    assert decoys == batch["benign"]["completion"]["input_ids"].shape[0] // 2
    found = harmful.delta("embedding")[:, : slots.shape[1]][slots].view(rows, 3, -1)
    placed = decoy.delta("embedding")
    for i in range(decoys):
        assert torch.equal(placed[i][decoy_slots[i]], found[i % rows]) and found[i % rows].norm() > 0
    assert (placed[~decoy_slots] == 0).all()
    assert not module.model.get_input_embeddings()._forward_hooks  # detached after the retain pass
    # Under the initial decoys the same step's retain term is another number: the suffix reached it.
    module.adversary.decoys = "initial"
    torch.manual_seed(0)
    assert not torch.isclose(module.compute_losses(batch)["loss_benign"], terms["loss_benign"])


def test_adversarial_decoys_need_a_suffix_adversary():
    with pytest.raises(ValueError, match="decoys: adversarial needs positions: suffix"):
        LATAdversary(layers=[0], decoys="adversarial")


def _retain_adversary_of(module, batch):
    seen = {}
    original = module._retain_adversary

    def retain_adversary(*args):
        seen["adversary"], terms = original(*args)
        return seen["adversary"], terms

    module._retain_adversary = retain_adversary
    terms = module.compute_losses(batch)
    return terms, seen["adversary"]


def test_the_benign_adversary_raises_the_retain_loss_within_the_radii_at_the_decoy_slots_and_benign_prompts(batch):
    module = calibrated(TargetedLATModule(adversary=LATAdversary(
        layers=["embedding"], epsilon=3.0, steps=2, positions="suffix", suffix_length=3, suffix_init="please",
        prompt_layers=[1], prompt_epsilon=0.3, benign_steps=6)), batch)
    module.train()
    torch.manual_seed(0)
    terms, adversary = _retain_adversary_of(module, batch)
    terms["loss"].backward()
    assert all("lora_" in n for n, p in module.named_parameters() if p.grad is not None)
    assert not module.model.get_input_embeddings()._forward_hooks  # detached after the retain pass
    assert terms["adversary/benign_loss_last"] > terms["adversary/benign_loss_first"]
    benign = module._with_slots(batch)[0]["benign"]["completion"]
    slots, prompt = adversary.masks["embedding"], adversary.masks[1]
    decoys = batch["benign"]["completion"]["input_ids"].shape[0] // 2
    assert (slots.sum(-1) == torch.tensor([3] * decoys + [0] * (len(slots) - decoys))).all()
    assert torch.equal(prompt, benign["prompt_mask"])
    suffix, layer = adversary.delta("embedding").norm(dim=-1), adversary.delta(1).norm(dim=-1)
    assert (suffix[~slots] == 0).all() and (suffix[slots] > 0).all()
    assert (layer[~prompt] == 0).all() and (layer[prompt & ~slots] > 0).any()  # the request words too
    assert (suffix <= 3.0 * float(module.calibration["site_norm/embedding"]) * (1 + 1e-5)).all()
    assert (layer <= 0.3 * float(module.calibration["site_norm/1"]) * (1 + 1e-5)).all()
    # The retain pass ran under it: with the benign adversary off, the same step's retain loss is lower.
    module.adversary.benign_steps = 0
    torch.manual_seed(0)
    assert module.compute_losses(batch)["loss_benign"] < terms["loss_benign"]


def test_the_benign_adversary_of_prompt_lat_perturbs_the_benign_prompts_at_its_layers_in_training_only(batch):
    module = calibrated(TargetedLATModule(adversary=LATAdversary(layers=[0, 1], epsilon=0.5, steps=2,
                                                                 benign_steps=3)), batch)
    module.train()
    terms, adversary = _retain_adversary_of(module, batch)
    prompt = batch["benign"]["completion"]["prompt_mask"]
    for site in (0, 1):
        assert torch.equal(adversary.masks[site], prompt)
        assert (adversary.delta(site).norm(dim=-1)[~prompt] == 0).all()
    assert "adversary/benign_loss_last" in terms
    module.eval()  # validation: no benign adversary
    assert module._retain_adversary(batch["benign"]["completion"], adversary, None, None) == (None, {})


def test_negative_benign_steps_are_a_one_line_error():
    with pytest.raises(ValueError, match="benign_steps must be >= 0"):
        LATAdversary(layers=[0], benign_steps=-1)
