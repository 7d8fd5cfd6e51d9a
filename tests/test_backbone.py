import pytest
import torch

from lit_safety import backbone
from lit_safety.backbone import BackboneError
from lit_safety.losses import masked_mean
from lit_safety.representations import capture_residuals, forward_states


def lora_with_effect(base):
    """``base`` with rank-4 LoRA adapters whose B is random: fresh LoRA B is zero, which would make
    any test that the adapters change something vacuous."""
    model = backbone.add_lora(base, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


@pytest.fixture
def peft_model(tiny_model_dir):
    return lora_with_effect(backbone.load_causal_lm(tiny_model_dir))


def test_reference_equals_base_bitwise(tiny_model_dir, peft_model):
    base = backbone.load_causal_lm(tiny_model_dir)
    ids = torch.randint(7, 25, (2, 9))
    expected = base(ids).logits
    assert not torch.equal(peft_model(ids).logits, expected)  # adapters do change the output
    with backbone.reference(peft_model):
        got = peft_model(ids).logits
    assert torch.equal(got, expected)
    assert not got.requires_grad


def test_reference_turns_dropout_off_and_restores_training_mode(tiny_model_dir):
    model = backbone.add_lora(backbone.load_causal_lm(tiny_model_dir), rank=4, dropout=0.5)
    model.train()
    with backbone.reference(model):
        assert not any(m.training for m in model.modules())
    assert all(m.training for m in model.modules())


def test_only_lora_weights_are_trainable_and_change(peft_model):
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    ids = torch.randint(7, 25, (2, 9))
    peft_model(ids, labels=ids).loss.backward()
    optimizer.step()
    for name, p in peft_model.named_parameters():
        changed = not torch.equal(before[name], p)
        assert changed == ("lora_" in name), name


def test_resolve_layers_convention_and_errors():
    assert backbone.resolve_layers([0, 2, -1], 4) == [0, 2, 3]
    with pytest.raises(BackboneError, match="layer 4 is out of range.*4 decoder layers"):
        backbone.resolve_layers([4], 4)
    with pytest.raises(BackboneError, match="out of range"):
        backbone.resolve_layers([-5], 4)
    with pytest.raises(BackboneError, match="integers"):
        backbone.resolve_layers(["3"], 4)


def test_captured_states_match_hidden_states(tiny_model_dir):
    model = backbone.load_causal_lm(tiny_model_dir)
    ids = torch.randint(7, 25, (2, 6))
    hidden = model(ids, output_hidden_states=True).hidden_states
    # transformers installs its own output-capturing hooks on first use; ours must come and go.
    hooks_before = [dict(layer._forward_hooks) for layer in backbone.decoder_layers(model)]
    with capture_residuals(model, [0, 1, 2, -1]) as states:
        model(ids)
    # hidden_states[i + 1] is the output of decoder layer i (the last one is reported post-norm by HF).
    for i in range(3):
        assert torch.equal(states[i], hidden[i + 1])
    assert states[3].shape == hidden[4].shape and not torch.equal(states[3], hidden[4])
    assert [dict(layer._forward_hooks) for layer in backbone.decoder_layers(model)] == hooks_before


def test_forward_states_without_logits_stops_early(tiny_model_dir):
    model = backbone.load_causal_lm(tiny_model_dir)
    ids = torch.randint(7, 25, (2, 6))
    mask = torch.ones_like(ids, dtype=torch.bool)
    full, logits = forward_states(model, ids, mask, [1])
    seen = []
    handle = backbone.decoder_layers(model)[2].register_forward_hook(lambda *a: seen.append(1))
    try:
        partial, none = forward_states(model, ids, mask, [1], logits=False)
    finally:
        handle.remove()
    assert none is None and logits.shape[-1] == model.config.vocab_size
    assert torch.equal(full[1], partial[1]) and not seen


def test_decoder_layers_error_names_the_model():
    class NoStack(torch.nn.Module):
        pass

    with pytest.raises(BackboneError, match="NoStack has no decoder layer list"):
        backbone.decoder_layers(NoStack())


def test_lora_on_chosen_layers_only(tiny_model_dir):
    model = backbone.add_lora(backbone.load_causal_lm(tiny_model_dir), layers=[-1])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".layers.3." in n for n in names)


def test_masked_mean_by_hand():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(masked_mean(x, mask), torch.tensor([2.0, 3.0]))
    assert torch.equal(masked_mean(x, mask, dim=1), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(masked_mean(x, torch.zeros(1, 3, dtype=torch.bool)), torch.zeros(2))


def test_registered_model_prefix_resolves_with_its_variant(tiny_model_dir):
    from lit_safety.named import MODEL_RESOLVERS

    seen = []
    backbone.register_model_resolver("mine", lambda variant: seen.append(variant) or tiny_model_dir)
    try:
        assert backbone.resolve_model("mine") == (tiny_model_dir, {})
        assert backbone.resolve_model("mine:small") == (tiny_model_dir, {})
        assert seen == [None, "small"]
    finally:
        del MODEL_RESOLVERS["mine"]


def test_missing_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="model directory not found"):
        backbone.resolve_model(str(tmp_path / "nope"))
    with pytest.raises(BackboneError, match="GGUF file not found"):
        backbone.resolve_model(str(tmp_path / "model.gguf"))


def test_qlora_4bit_trains_a_step_on_cpu(tmp_path):
    import bitsandbytes  # noqa: F401
    from conftest import tiny_llama

    # bitsandbytes' CPU 4-bit kernel packs rows in blocks of 32 and inputs in quantization blocks of
    # 64, as every real model's dimensions allow.
    tiny_llama(tmp_path, vocab_size=32, hidden=64)
    model = backbone.add_lora(backbone.load_causal_lm(str(tmp_path), quantization="4bit"), rank=4)
    assert type(backbone.decoder_layers(model)[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(7, 25, (2, 9))
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable))


def test_an_adapter_directory_loads_as_its_base_with_the_adapter_merged(tiny_model_dir, peft_model, tmp_path):
    """A previous run's adapter is a model: merged into its base (chains follow to the first stage),
    with its base's layers and, when saved without one, its base's tokenizer."""
    stage1 = str(tmp_path / "stage1")
    peft_model.save_pretrained(stage1)  # names tiny_model_dir as its base, no tokenizer beside it
    ids = torch.randint(7, 25, (2, 9))
    merged = backbone.load_causal_lm(stage1)
    assert type(merged).__name__ == "LlamaForCausalLM" and not any(p.requires_grad for p in merged.parameters())
    assert torch.allclose(merged(ids).logits, peft_model(ids).logits, atol=1e-5)
    assert backbone.num_decoder_layers(stage1) == backbone.num_decoder_layers(tiny_model_dir) == 4
    assert backbone.load_tokenizer(stage1).get_vocab() == backbone.load_tokenizer(tiny_model_dir).get_vocab()
    assert backbone.model_identity(stage1)["base"] == backbone.model_identity(tiny_model_dir)

    stage2_model = lora_with_effect(backbone.load_causal_lm(stage1))
    stage2_model.peft_config["default"].base_model_name_or_path = stage1
    stage2 = str(tmp_path / "stage2")
    stage2_model.save_pretrained(stage2)
    assert torch.allclose(backbone.load_causal_lm(stage2)(ids).logits, stage2_model(ids).logits, atol=1e-5)


def test_an_adapter_as_the_model_cannot_be_quantized_and_a_missing_base_is_named(peft_model, tmp_path):
    stage1 = str(tmp_path / "stage1")
    peft_model.save_pretrained(stage1)
    with pytest.raises(BackboneError, match="stage1: an adapter directory as the model cannot be quantized"):
        backbone.load_causal_lm(stage1, quantization="4bit")
    orphan = str(tmp_path / "orphan")
    peft_model.peft_config["default"].base_model_name_or_path = str(tmp_path / "gone")
    peft_model.save_pretrained(orphan)
    with pytest.raises(BackboneError, match="orphan: the base of this adapter: model directory not found: .*gone"):
        backbone.load_causal_lm(orphan)
