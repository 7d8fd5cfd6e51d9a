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
    moved = end["distance/harmful_to_reference"].item()
    kept = end["distance/benign_to_reference"].item()
    # The margins ask harmful states to end at least 1.0 reference norms from where they were and
    # benign states within 0.5 of theirs: harmful states must move at least twice as far.
    assert moved > 2 * kept, (moved, kept)
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
])
def test_bad_miner_settings_are_one_line_errors(options, message):
    with pytest.raises((ValueError, BackboneError), match=message):
        TripletDefenseModule(layers_benign=[1], layers_harmful=[1], mining=True, **options).configure_model()
