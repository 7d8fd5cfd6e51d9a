import lightning as L
import pytest
import torch

from lit_safety import SafetyDataModule, TripletDefenseModule, backbone
from lit_safety.adversaries import ResidualAttack
from lit_safety.backbone import BackboneError
from lit_safety.losses import toward


@pytest.fixture
def harmful_batch():
    data = SafetyDataModule(batch_size=8, val_fraction=0.0, tokenizer="organism")
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    return batch


def test_residual_attack_starts_as_identity_lowers_nll_and_leaves_nothing_behind(harmful_batch):
    model = backbone.add_lora(backbone.load_causal_lm("organism"))
    harmful = harmful_batch["harmful"]["completion"]
    ids, mask = harmful["input_ids"], harmful["attention_mask"]
    names_before = [n for n, _ in model.named_parameters()]
    lora_grads_before = [p.grad for p in model.parameters() if p.requires_grad]
    clean = model(input_ids=ids, attention_mask=mask).logits
    attack = ResidualAttack.for_model(model, layer=0)
    with attack.attached(model):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, clean)  # identity at start

    def nll():
        with attack.attached(model):
            logits = model(input_ids=ids, attention_mask=mask).logits
        return toward(logits, ids, harmful["completion_mask"])

    losses = attack.train(nll, steps=20, lr=1e-2)
    assert losses[-1] < losses[0]
    assert not any(layer._forward_hooks for layer in backbone.decoder_layers(model))
    assert [n for n, _ in model.named_parameters()] == names_before
    assert [p.grad for p in model.parameters() if p.requires_grad] == lora_grads_before  # all None
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, clean)


def test_gradients_reach_only_lora(harmful_batch):
    module = TripletDefenseModule(layers_benign=[0, 1], layers_harmful=[1], mining=True, mining_interval=1,
                                  mining_steps=2, mining_layers=[0])
    module.configure_model()
    module.train()
    module.compute_losses(harmful_batch)["loss"].backward()
    with_grad = {n for n, p in module.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert module.miner is not None and all(p.grad is None or p.grad.abs().sum() >= 0 for p in module.miner.parameters())
    assert not any(t is p for t in module.miner.parameters() for p in module.parameters())


def test_mining_layer_after_the_triplet_layers_is_rejected():
    module = TripletDefenseModule(layers_benign=[0], layers_harmful=[0], mining=True, mining_layers=[1])
    with pytest.raises(BackboneError, match="mining_layers .* must lie before the deepest triplet layer"):
        module.configure_model()


def test_short_run_moves_harmful_states_away_and_keeps_benign_states(harmful_batch):
    L.seed_everything(0)  # the data order and dropout must not depend on which tests ran before
    module = TripletDefenseModule(layers_benign=[0, 1], layers_harmful=[0, 1],
                                  optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    module.configure_model()
    module.eval()
    with torch.no_grad():
        start = module.compute_losses(harmful_batch)
    assert abs(start["distance/harmful_to_reference"]) < 1e-5  # fresh LoRA: the model is the reference
    trainer = L.Trainer(max_steps=100, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, SafetyDataModule(batch_size=8, val_fraction=0.0))
    module.eval()
    with torch.no_grad():
        end = module.compute_losses(harmful_batch)
    # The triplet terms (2506.11938 Eq. 2-3) order distances: a harmful state nearer the harmful mean
    # than its reference state (at the start it sits on its reference), a benign state nearer its
    # reference than the harmful mean. Benign states move too (the harmful mean they must keep away
    # from moves), but less than harmful ones.
    assert start["distance/harmful_to_harmful_mean"] > 0
    assert end["distance/harmful_to_harmful_mean"] < end["distance/harmful_to_reference"]
    assert end["distance/benign_to_reference"] < end["distance/benign_to_harmful_mean"]
    moved = end["distance/harmful_to_reference"].item()
    kept = end["distance/benign_to_reference"].item()
    assert moved > kept, (moved, kept)
    assert end["loss_harmful"] < start["loss_harmful"]


@pytest.mark.parametrize("positions", ["prompt", "completion", "all"])
def test_triplet_terms_read_only_the_chosen_positions(harmful_batch, positions):
    # States are causal: with positions="prompt" the triplet terms cannot see the responses, so
    # changing every response token leaves them unchanged; with the other settings they move.
    module = TripletDefenseModule(layers_benign=[-1], layers_harmful=[-1], kl_weight=0.0, positions=positions)
    module.configure_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # away from the reference, so the terms are not all zero
    module.eval()
    changed = {stream: {k: v.clone() for k, v in s["completion"].items()} for stream, s in harmful_batch.items()}
    for sequences in changed.values():
        response = sequences["completion_mask"]
        sequences["input_ids"][response] = (sequences["input_ids"][response] + 1) % 40 + 7
    with torch.no_grad():
        before = module.compute_losses(harmful_batch)
        after = module.compute_losses({stream: {"completion": s} for stream, s in changed.items()})
    same = all(torch.allclose(before[k], after[k]) for k in ("loss_benign", "loss_harmful"))
    assert same == (positions == "prompt")


def test_latent_miner_restores_harmful_completions_within_its_radius_and_only_on_mined_rows(harmful_batch):
    module = TripletDefenseModule(layers_benign=[0, 1], layers_harmful=[1], mining=True, miner="latent",
                                  mining_interval=1, mining_steps=8, mining_lr=0.25, mining_fraction=0.5,
                                  mining_layers=["embedding", 0], mining_epsilon=2.0)
    module.configure_model()
    module.calibration = module.calibrate(harmful_batch)
    assert set(module.calibration) == {"site_norm/embedding", "site_norm/0"}
    module.train()
    logged = {}
    module.log_dict = lambda values, **_: logged.update(values)
    module.compute_losses(harmful_batch)["loss"].backward()
    with_grad = {n for n, p in module.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert logged["train/mining_loss_last"] < logged["train/mining_loss_first"]
    site = "embedding" if logged["train/mining_layer"] == -1.0 else 0
    assert logged["train/mining_radius"] == pytest.approx(2.0 * float(module.calibration[f"site_norm/{site}"]))
    delta = module.latent.delta(site)
    rows = harmful_batch["harmful"]["completion"]["input_ids"].shape[0]
    assert delta.shape[0] == rows and torch.all(delta[rows // 2:] == 0)  # clean rows pass unperturbed
    assert delta.norm(dim=-1).max() <= logged["train/mining_radius"] * (1 + 1e-5)
    prompt = harmful_batch["harmful"]["completion"]["prompt_mask"][: rows // 2]
    assert torch.all(delta[: rows // 2][~prompt.bool()] == 0)  # prompt positions only
    module.eval()
    module.compute_losses(harmful_batch)
    assert module.latent is None  # validation is never attacked


@pytest.mark.parametrize("options, message", [
    ({"miner": "latent", "mining_interval": 30}, "mining_interval: the latent miner .* set mining_interval: 1"),
    ({"mining_layers": ["embedding"]}, "model.mining_layers: the residual miner acts after decoder layers"),
    ({"miner": "latent", "mining_interval": 1, "mining_layers": ["resid"]}, "model.mining_layers: unknown attack site"),
    ({"miner": "suffix", "mining_interval": 1, "mining_suffix_length": 0}, "mining_suffix_length must be >= 1"),
    ({"miner": "suffix", "mining_interval": 1, "mining_suffix_init": "zzqx"}, "mining_suffix_init: 'zzqx' is not in"),
    ({"miner": ["residual", "latent"], "mining_interval": 1}, "miner: the residual miner .* cannot take turns"),
    ({"miner": ["latent", "latent"], "mining_interval": 1}, "miner: a miner or a list of distinct miners"),
    ({"miner": [], "mining_interval": 1}, "miner: a miner or a list of distinct miners"),
    ({"miner": ["latent", "suffix"], "mining_interval": 1, "mining_epsilon": [1.0]},
     r"mining_epsilon: one radius or one per miner \(\['latent', 'suffix'\]\)"),
    ({"miner": ["latent", "suffix"], "mining_interval": 5}, "mining_interval: the latent/suffix miner"),
    ({"miner": "latent", "mining_interval": 1, "mining_together": True}, "mining_together: the latent and suffix"),
    ({"miner": ["latent", "suffix"], "mining_interval": 1, "mining_together": True, "mining_layers": ["embedding"]},
     "mining_layers: with mining_together the latent miner acts after decoder layers"),
])
def test_bad_miner_settings_are_one_line_errors(options, message):
    with pytest.raises((ValueError, BackboneError), match=message):
        TripletDefenseModule(layers_benign=[1], layers_harmful=[1], mining=True, **options).configure_model()


def test_suffix_miner_attacks_through_soft_vectors_at_the_end_of_the_user_turn(harmful_batch):
    from lit_safety.representations import forward_states

    module = TripletDefenseModule(layers_benign=[0, 1], layers_harmful=[1], mining=True, miner="suffix",
                                  mining_interval=1, mining_steps=8, mining_lr=0.25, mining_fraction=0.5,
                                  mining_epsilon=3.0, mining_suffix_length=4, mining_suffix_init="please")
    module.configure_model()
    module.calibration = module.calibrate(harmful_batch)
    assert set(module.calibration) == {"site_norm/embedding"}
    module.train()
    logged = {}
    module.log_dict = lambda values, **_: logged.update(values)
    module.compute_losses(harmful_batch)["loss"].backward()
    assert all("lora_" in n for n, p in module.named_parameters() if p.grad is not None)
    assert logged["train/mining_loss_last"] < logged["train/mining_loss_first"] and logged["train/mining_layer"] == -1.0
    # The slots: four "please" tokens right before the template closes the user turn, in the mined rows only.
    harmful = harmful_batch["harmful"]["completion"]
    rows = harmful["input_ids"].shape[0]
    slotted = module.slotted
    first = slotted.sequences["input_ids"][0][slotted.sequences["prompt_mask"][0]]
    text = module.tokenizer.decode(first)
    original = module.tokenizer.decode(harmful["input_ids"][0][harmful["prompt_mask"][0]])
    tail, bang = module._suffix_slot
    assert text.replace(" please please please please", "", 1) == original and tail > 0 and first[-tail - 1] == bang
    assert slotted.slots[: rows // 2].sum(-1).tolist() == [4] * (rows // 2) and not slotted.slots[rows // 2:].any()
    # Clean rows' states, read back at their positions, are those of the batch without slots.
    with torch.no_grad():
        attacked = module._harmful_states(harmful, [1])[1]
        clean = forward_states(module.model, harmful["input_ids"], harmful["attention_mask"], [1], logits=False)[0][1]
    keep = harmful["attention_mask"][rows // 2:]
    torch.testing.assert_close(attacked[rows // 2:][keep], clean[rows // 2:][keep], atol=1e-5, rtol=1e-5)
    assert (attacked[: rows // 2] - clean[: rows // 2]).abs().max() > 1e-3  # the mined rows are attacked


def test_suffix_slots_by_hand():
    from lit_safety.adversaries import suffix_slots

    prompt = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    attention = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    sequences = {"input_ids": torch.tensor([[1, 2, 3, 9, 8, 0], [4, 5, 6, 9, 8, 7]]), "attention_mask": attention,
                 "prompt_mask": prompt, "completion_mask": attention & ~prompt}
    # Two slots in the first row, one template token (3) before its prompt ends; the second row is
    # padded by two at the end.
    out = suffix_slots(sequences, rows=1, length=2, tail=1, token_id=77)
    assert out.sequences["input_ids"].tolist() == [[1, 2, 77, 77, 3, 9, 8, 0], [4, 5, 6, 9, 8, 7, 77, 77]]
    assert out.sequences["attention_mask"].int().tolist() == [[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0, 0]]
    assert out.sequences["prompt_mask"].int().tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    assert out.sequences["completion_mask"].int().tolist() == [[0, 0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1, 0, 0]]
    assert out.slots.int().tolist() == [[0, 0, 1, 1, 0, 0, 0, 0], [0] * 8]
    states = torch.arange(16.0).view(2, 8, 1)
    assert out.original(states).squeeze(-1).tolist() == [[0, 1, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13]]
    # Slot tokens given one by one go in in order; the padding row's slots are masked out whatever they hold.
    out = suffix_slots(sequences, rows=1, length=2, tail=1, token_id=torch.tensor([77, 78]))
    assert out.sequences["input_ids"][0].tolist() == [1, 2, 77, 78, 3, 9, 8, 0]
    assert out.sequences["attention_mask"].int().tolist() == [[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0, 0]]


def test_miners_take_turns_each_with_its_own_radius(harmful_batch):
    module = TripletDefenseModule(layers_benign=[0, 1], layers_harmful=[1], mining=True, miner=["latent", "suffix"],
                                  mining_interval=1, mining_steps=2, mining_lr=0.25, mining_fraction=0.5,
                                  mining_layers=[0], mining_epsilon=[0.5, 3.0], mining_suffix_length=4,
                                  mining_suffix_init="please")
    module.configure_model()
    module.calibration = module.calibrate(harmful_batch)
    assert set(module.calibration) == {"site_norm/0", "site_norm/embedding"}  # every miner's sites
    module.train()
    seen = {}
    for _ in range(8):
        logged = {}
        module.log_dict = lambda values, **_: logged.update(values)
        module.compute_losses(harmful_batch)
        miner = ["latent", "suffix"][int(logged["train/miner"])]
        site = "embedding" if miner == "suffix" else 0
        assert logged["train/mining_layer"] == (-1.0 if miner == "suffix" else 0.0)
        assert (module.slotted is not None) == (miner == "suffix")  # soft vectors only on the suffix miner's turns
        seen[miner] = logged["train/mining_radius"]
        epsilon = 3.0 if miner == "suffix" else 0.5
        assert seen[miner] == pytest.approx(epsilon * float(module.calibration[f"site_norm/{site}"]))
    assert set(seen) == {"latent", "suffix"}


def test_miners_together_perturb_every_mined_example_at_both_sites_each_within_its_radius(harmful_batch):
    module = TripletDefenseModule(layers_benign=[0, 1], layers_harmful=[1], mining=True, miner=["latent", "suffix"],
                                  mining_interval=1, mining_steps=8, mining_lr=0.25, mining_fraction=0.5,
                                  mining_layers=[0], mining_epsilon=[0.5, 3.0], mining_suffix_length=4,
                                  mining_suffix_init="please", mining_together=True)
    module.configure_model()
    module.calibration = module.calibrate(harmful_batch)
    module.train()
    logged = {}
    module.log_dict = lambda values, **_: logged.update(values)
    module.compute_losses(harmful_batch)["loss"].backward()
    assert all("lora_" in n for n, p in module.named_parameters() if p.grad is not None)
    assert logged["train/mining_loss_last"] < logged["train/mining_loss_first"] and "train/miner" not in logged
    assert logged["train/mining_layer"] == 0.0
    rows = harmful_batch["harmful"]["completion"]["input_ids"].shape[0]
    slots = module.slotted.slots  # the suffix miner's soft vectors, in the mined rows only
    prompt = module.slotted.sequences["prompt_mask"] & ~slots
    for miner, site, epsilon, where in (("latent", 0, 0.5, prompt), ("suffix", "embedding", 3.0, slots)):
        radius = logged[f"train/mining_radius_{miner}"]
        assert radius == pytest.approx(epsilon * float(module.calibration[f"site_norm/{site}"]))
        delta = module.latent.delta(site)
        norms = delta.norm(dim=-1)
        assert norms.max() <= radius * (1 + 1e-5) and logged[f"train/mining_norm_{miner}"] > 0
        assert torch.all(norms[~where] == 0) and torch.all(norms[rows // 2:] == 0)  # its own positions only
        assert (norms[: rows // 2][where[: rows // 2]] > 0).all()  # on every mined example


@pytest.mark.parametrize("miner", ["latent", "suffix"])
def test_refusal_term_is_lats_model_objective_on_the_mined_examples_under_their_perturbation(harmful_batch, miner):
    from lit_safety.representations import completion_window

    def module_with(fraction):
        module = TripletDefenseModule(layers_benign=[0, 1], layers_harmful=[1], mining=True, miner=miner,
                                      mining_interval=1, mining_steps=8, mining_lr=0.25, mining_fraction=fraction,
                                      mining_layers=[0], mining_epsilon=3.0, mining_suffix_length=4,
                                      mining_suffix_init="please", refusal_weight=2.0)
        module.configure_model()
        module.calibration = module.calibrate(harmful_batch)
        module.log_dict = lambda *_, **__: None
        return module.train()

    refusal = harmful_batch["harmful"]["refusal"]
    assert module_with(0.5).stream_fields["harmful"] == ("completion", "refusal")
    assert TripletDefenseModule().stream_fields["harmful"] == ("completion",)  # the paper's loss needs none
    clean = module_with(0.0)  # nothing mined: refusal SFT on the requests as they are
    terms = clean.compute_losses(harmful_batch)
    with torch.no_grad():
        expected = toward(*completion_window(clean.model, refusal))
    torch.testing.assert_close(terms["loss_refusal"], expected)
    attacked = module_with(0.5)
    terms = attacked.compute_losses(harmful_batch)
    assert terms["loss"] > terms["loss_refusal"] * 2.0  # in the total, at its weight
    with torch.no_grad():
        unperturbed = toward(*completion_window(attacked.model, refusal))
    assert terms["loss_refusal"] > unperturbed + 1e-3  # the adversary, fitted toward the harmful answer, hurts it
    terms["loss"].backward()
    with_grad = {n for n, p in attacked.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)


def test_a_list_of_suffix_lengths_takes_one_per_step_in_turn_for_the_completion_and_its_refusal(harmful_batch,
                                                                                                monkeypatch):
    from lit_safety.methods import triplet

    module = TripletDefenseModule(layers_benign=[0, 1], layers_harmful=[1], mining=True, miner="suffix",
                                  mining_interval=1, mining_steps=1, mining_fraction=0.5, mining_epsilon=3.0,
                                  mining_suffix_length=[2, 5], mining_suffix_init="please", refusal_weight=1.0)
    module.configure_model()
    module.calibration = module.calibrate(harmful_batch)
    module.log_dict = lambda *_, **__: None
    module.train()
    inserted = []  # slots per call: the completions', then the refusals' of the same step
    original = triplet.suffix_slots

    def suffix_slots(sequences, rows, length, *args):
        out = original(sequences, rows, length, *args)
        inserted.append(int(out.slots[0].sum()))
        return out

    monkeypatch.setattr(triplet, "suffix_slots", suffix_slots)
    for step in range(3):
        monkeypatch.setattr(TripletDefenseModule, "global_step", property(lambda self, step=step: step))
        module.compute_losses(harmful_batch)
    assert inserted == [2, 2, 5, 5, 2, 2]


def test_random_starts_give_the_completion_and_its_refusal_one_random_suffix_start_per_step(harmful_batch,
                                                                                          monkeypatch):
    from lit_safety.methods import triplet

    module = TripletDefenseModule(layers_benign=[0, 1], layers_harmful=[1], mining=True, miner="suffix",
                                  mining_interval=1, mining_steps=1, mining_fraction=0.5, mining_epsilon=3.0,
                                  mining_suffix_length=4, mining_suffix_init="please", mining_random_start=0.5,
                                  refusal_weight=1.0)
    module.configure_model()
    module.calibration = module.calibrate(harmful_batch)
    logged = []
    module.log_dict = lambda values, **_: logged.append(values["train/mining_random_start"])
    module.train()
    starts = []  # slot tokens per call: the completions', then the refusals' of the same step
    original = triplet.suffix_slots

    def suffix_slots(sequences, rows, length, *args):
        out = original(sequences, rows, length, *args)
        starts.append(out.sequences["input_ids"][0][out.slots[0]].tolist())
        return out

    monkeypatch.setattr(triplet, "suffix_slots", suffix_slots)
    for _ in range(12):
        module.compute_losses(harmful_batch)
    please = module._suffix_slot[1]
    completions, refusals = starts[::2], starts[1::2]
    assert completions == refusals  # a request and its refusal share one prompt
    random = [s for s in completions if s != [please] * 4]
    assert 0 < len(random) < 12 and logged == [float(s != [please] * 4) for s in completions]
    special = set(module.tokenizer.all_special_ids)
    assert all(len(set(s)) > 1 and not special & set(s) for s in random)  # writable tokens, drawn one by one


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_a_random_start_share_outside_zero_to_one_is_a_one_line_error(value):
    with pytest.raises(ValueError, match="mining_random_start must be in \\[0, 1\\]"):
        TripletDefenseModule(mining=True, miner="suffix", mining_interval=1, mining_random_start=value)


@pytest.mark.parametrize("length", [0, [], [3, 0]])
def test_a_suffix_length_below_one_is_a_one_line_error(length):
    with pytest.raises(ValueError, match="mining_suffix_length must be >= 1, or a list of such lengths"):
        TripletDefenseModule(mining=True, miner="suffix", mining_interval=1, mining_suffix_length=length)


def test_warm_starts_resume_the_latest_optimised_suffixes_and_the_bank_survives_a_checkpoint(harmful_batch,
                                                                                           monkeypatch):
    from lit_safety.methods import triplet

    def module():
        m = TripletDefenseModule(layers_benign=[0, 1], layers_harmful=[1], mining=True, miner="suffix",
                                 mining_interval=1, mining_steps=2, mining_fraction=0.5, mining_epsilon=3.0,
                                 mining_suffix_length=4, mining_suffix_init="please", mining_warm_start=1.0,
                                 mining_bank_size=8)
        m.configure_model()
        m.calibration = m.calibrate(harmful_batch)
        m.log_dict = lambda values, **_: logged.append(values["train/mining_warm_start"])
        m.train()
        return m

    starts, ends, logged = [], [], []
    optimise = triplet.LatentAdversary.optimise

    def recorded(self, *args, **kwargs):
        slots = self.masks["embedding"]
        starts.append(self.units["embedding"][slots].detach().clone())
        out = optimise(self, *args, **kwargs)
        ends.append(self.units["embedding"][slots].detach().clone())
        return out

    monkeypatch.setattr(triplet.LatentAdversary, "optimise", recorded)
    first = module()
    for _ in range(2):
        first.compute_losses(harmful_batch)
    assert logged == [0.0, 1.0]  # nothing to start from at the first step
    assert not starts[0].any() and ends[0].abs().sum() > 0
    torch.testing.assert_close(starts[1], ends[0])  # each row where the last step's optimisation left one
    state = first.training_state()
    rows = len(ends[0]) // 4
    assert state["suffix_bank"][4].shape[:2] == (2 * rows, 4)  # both steps' rows, 4 slots each

    resumed = module()
    resumed.load_training_state(state)
    resumed.compute_losses(harmful_batch)
    torch.testing.assert_close(starts[2], ends[1])  # a resumed run warm-starts from the checkpoint's bank


@pytest.mark.parametrize("options, message", [
    ({"mining_warm_start": 1.5}, "mining_warm_start must be in \\[0, 1\\]"),
    ({"mining_bank_size": 0}, "mining_bank_size must be >= 1"),
    ({"mining_warm_start": 0.5, "miner": "latent"}, "warm starts are the suffix miner's"),
])
def test_bad_warm_start_settings_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message):
        TripletDefenseModule(mining=True, **{"miner": "suffix", "mining_interval": 1, **options})
