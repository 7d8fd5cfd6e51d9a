"""Properties every method must have, checked on the tiny organism: only LoRA weights change, the
reference stays the base model, and nothing but adapter weights reaches the checkpoint."""

import json
import os

import lightning as L
import pytest
import torch

from lit_safety import (
    CircuitBreakerModule,
    RefusalFeatureATModule,
    RefusalSFTModule,
    SafetyDataModule,
    TargetedLATModule,
    TripletDefenseModule,
    backbone,
    export_adapter,
    export_merged,
)
from lit_safety.methods import LATAdversary
from lit_safety.methods.lat_objectives import DPO, RMU

METHODS = {
    "refusal_sft": (RefusalSFTModule, {}),
    "triplet": (TripletDefenseModule, {"layers_benign": [0, 1], "layers_harmful": [1]}),
    "triplet_mining": (TripletDefenseModule, {"layers_benign": [1], "layers_harmful": [1], "mining": True,
                                              "mining_interval": 1, "mining_steps": 2, "mining_layers": [0]}),
    "circuit_breaker": (CircuitBreakerModule, {"layers": [0, 1]}),
    "lat_refusal": (TargetedLATModule, {"adversary": LATAdversary(layers=["embedding", 1], steps=2)}),
    "lat_rmu": (TargetedLATModule, {"objective": RMU(layer=1), "adversary": LATAdversary(layers=[0], steps=2)}),
    "lat_dpo": (TargetedLATModule, {"objective": DPO(), "adversary": LATAdversary(layers=[0], steps=2)}),
    "refat": (RefusalFeatureATModule, {"refresh_interval": 1, "kl_weight": 1.0}),
    "refusal_sft_embedding_noise": (RefusalSFTModule, {"embedding_noise": 0.5}),
}


def fit(module, steps: int = 2):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, SafetyDataModule(batch_size=4, val_fraction=0.0))
    return trainer


@pytest.mark.parametrize("name", METHODS)
def test_only_lora_changes_and_reference_stays_the_base(name):
    cls, kwargs = METHODS[name]
    # Plain Adam: weight decay would move LoRA weights even without a gradient.
    module = cls(**kwargs, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    fit(module)
    changed = {n for n, p in module.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]
    assert {n for n, p in module.named_parameters() if p.requires_grad} >= changed

    base = backbone.load_causal_lm("organism")
    ids = torch.randint(7, 40, (2, 8))
    with module.reference():
        reference_logits = module.model(ids).logits
    assert torch.equal(reference_logits, base(ids).logits)
    assert not torch.equal(module.model(ids).logits, reference_logits)
    assert all("lora_" in k for k in module.state_dict())
    assert not any(layer._forward_hooks for layer in backbone.decoder_layers(module.model))


def test_embedding_noise_moves_each_token_by_its_share_of_its_norm_in_training_only():
    from lit_safety.methods.base import noisy_embeddings

    layer = torch.nn.Embedding(5, 4)
    embeddings = torch.tensor([[[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]])  # norms 5 and 1
    moved = noisy_embeddings(layer.train(), embeddings, 0.2) - embeddings
    assert torch.allclose(moved.norm(dim=-1), torch.tensor([[1.0, 0.2]]))
    assert torch.equal(noisy_embeddings(layer.eval(), embeddings, 0.2), embeddings)
    # Shrinking scales each token by its own factor in [1 - shrink, 1], direction kept; unchosen rows stay.
    batch = torch.cat([embeddings.repeat(1, 200, 1), embeddings.repeat(1, 200, 1)])
    shrunk = noisy_embeddings(layer.train(), batch, 0.0, rows=torch.tensor([True, False]), shrink=0.4)
    ratio = shrunk[0].norm(dim=-1) / batch[0].norm(dim=-1)
    assert ratio.min() >= 0.6 - 1e-6 and ratio.max() <= 1 + 1e-6 and ratio.max() - ratio.min() > 0.3
    assert torch.allclose(torch.nn.functional.cosine_similarity(shrunk[0], batch[0], dim=-1), torch.ones(400))
    assert torch.equal(shrunk[1], batch[1])

    module = RefusalSFTModule(embedding_noise=0.5)
    module.configure_model()
    ids = torch.randint(7, 40, (2, 8))
    module.train()
    with module.embedding_noise():
        assert not torch.equal(module.model(ids).logits, module.model(ids).logits)  # a fresh draw each pass
        module.eval()
        assert torch.equal(module.model(ids).logits, module.model(ids).logits)
    module.train()  # outside a training step the model carries no hook (copies for attacks stay clean)
    assert torch.equal(module.model(ids).logits, module.model(ids).logits)
    assert not module.model.get_input_embeddings()._forward_hooks
    with pytest.raises(ValueError, match="embedding_noise"):
        RefusalSFTModule(embedding_noise=-0.1)
    with pytest.raises(ValueError, match="embedding_shrink"):
        RefusalSFTModule(embedding_shrink=1.0)
    with pytest.raises(ValueError, match="benign_noise"):
        RefusalSFTModule(benign_noise=-0.5)
    module = RefusalSFTModule(embedding_shrink=0.5)  # shrinking alone reaches the model too
    module.configure_model()
    module.train()
    with module.embedding_noise():
        assert not torch.equal(module.model(ids).logits, module.model(ids).logits)


def _without_padding(row: torch.Tensor) -> torch.Tensor:
    nonzero = row.nonzero()
    return row[: int(nonzero[-1]) + 1] if len(nonzero) else row[:0]


@pytest.mark.parametrize("name", ["refusal_sft", "triplet", "circuit_breaker", "lat_refusal", "refat"])
@pytest.mark.parametrize("noise, reached", [({"embedding_noise": 0.5}, {"harmful"}), ({"benign_noise": 0.5}, {"benign"}),
                                            ({"embedding_noise": 0.5, "benign_noise": 0.5}, {"harmful", "benign"})])
def test_embedding_noise_reaches_the_harmful_passes_and_benign_noise_the_benign_ones(name, noise, reached):
    cls, kwargs = METHODS[name]
    if name == "lat_refusal":  # an adversary after layer 1: only the noise moves the first layer's input
        kwargs = {**kwargs, "adversary": LATAdversary(layers=[1], steps=2)}
    module = cls(**kwargs, **noise)
    module.configure_model()
    passes = []  # [input ids, clean embeddings, what the first decoder layer received]

    def decoder_input(_module, args, kw):
        passes[-1].append((args[0] if args else kw["hidden_states"]).detach().clone())

    hooks = [module.model.get_input_embeddings().register_forward_hook(
                 lambda _module, args, out: passes.append([args[0], out.detach().clone()])),
             backbone.decoder_layers(module.model)[0].register_forward_pre_hook(decoder_input, with_kwargs=True)]
    batches = []
    step = module.training_step
    module.training_step = lambda batch, *args: batches.append(batch) or step(batch, *args)
    fit(module, steps=1)
    for hook in hooks:
        hook.remove()
    (batch,) = batches
    rows = lambda stream: [_without_padding(r) for seq in batch[stream].values() for r in seq["input_ids"]]  # noqa: E731
    harmful, benign = rows("harmful"), rows("benign")
    noised = {"harmful": 0, "benign": 0}
    for ids, clean, received in (p for p in passes if len(p) == 3):
        for r in range(len(ids)):
            kind = next((k for k, known in (("benign", benign), ("harmful", harmful))
                         if any(torch.equal(_without_padding(ids[r]), x) for x in known)), None)
            if kind is not None and not torch.allclose(clean[r], received[r]):
                noised[kind] += 1
    assert {kind for kind, count in noised.items() if count} == reached, noised


def _noised_passes(module) -> int:
    """Forward passes in one training step whose first decoder layer received moved embeddings."""
    module.configure_model()
    noised = []

    def decoder_input(_module, args, kw):
        received = args[0] if args else kw["hidden_states"]
        noised.append(not torch.allclose(clean[-1], received))

    clean = []
    hooks = [module.model.get_input_embeddings().register_forward_hook(
                 lambda _module, args, out: clean.append(out.detach().clone())),
             backbone.decoder_layers(module.model)[0].register_forward_pre_hook(decoder_input, with_kwargs=True)]
    fit(module, steps=1)
    for hook in hooks:
        hook.remove()
    return sum(noised)


@pytest.mark.parametrize("name", ["triplet_mining", "lat_rmu"])
def test_noisy_adversaries_optimise_under_the_noise(name):
    cls, kwargs = METHODS[name]  # adversaries after a decoder layer: only the noise moves layer 0's input
    torch.manual_seed(0)
    clean_adversary = _noised_passes(cls(**kwargs, embedding_noise=0.5))
    torch.manual_seed(0)
    noisy_adversary = _noised_passes(cls(**kwargs, embedding_noise=0.5, noisy_adversaries=True))
    steps = kwargs.get("mining_steps") or kwargs["adversary"].steps
    assert clean_adversary > 0 and noisy_adversary >= clean_adversary + steps, (clean_adversary, noisy_adversary)

    with pytest.raises(ValueError, match="noisy_adversaries: .*embedding_noise"):
        cls(**kwargs, noisy_adversaries=True)
    with pytest.raises(ValueError, match="noisy_adversaries: RefusalSFTModule has no inner adversary"):
        RefusalSFTModule(embedding_noise=0.5, noisy_adversaries=True)
    with pytest.raises(ValueError, match="noisy_adversaries: .*mining: true"):
        TripletDefenseModule(embedding_noise=0.5, noisy_adversaries=True)


def test_exported_adapter_and_merged_model_reproduce_the_trained_module(tmp_path, monkeypatch):
    import peft.utils.save_and_load
    from peft import PeftModel

    def no_hub(*args, **kwargs):
        raise AssertionError("exporting an adapter must not look the base model up on the Hub")

    monkeypatch.setattr(peft.utils.save_and_load, "check_file_exists_on_hf_hub", no_hub)

    module = RefusalSFTModule(optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    module.configure_model()
    fit(module)
    module.eval()
    ids = torch.randint(7, 40, (2, 8))
    expected = module.model(ids).logits
    merged = backbone.load_causal_lm(export_merged(module, str(tmp_path / "merged")))
    adapter = PeftModel.from_pretrained(backbone.load_causal_lm("organism"), export_adapter(module, str(tmp_path / "adapter")))
    assert torch.allclose(merged(ids).logits, expected, atol=1e-4)
    assert torch.allclose(adapter.eval()(ids).logits, expected, atol=1e-5)
    # lit_safety.json names the base as the module did, so evaluation finds it on any machine (a GGUF
    # path would lose its file); adapter_config.json names the local directory, for plain peft.
    from lit_safety.artifacts import load_for_evaluation

    with open(tmp_path / "adapter" / "lit_safety.json") as f:
        assert json.load(f)["base_model"] == "organism"
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        assert os.path.isdir(json.load(f)["base_model_name_or_path"])
    reloaded, _ = load_for_evaluation(str(tmp_path / "adapter"))
    assert torch.allclose(reloaded(ids).logits, expected, atol=1e-5)
