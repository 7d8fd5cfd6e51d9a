"""ReFAT: the refusal-feature projection against hand-computed values, the feature itself, and a short
run that teaches the model to refuse with its refusal feature ablated."""

import lightning as L
import torch

from lit_safety import RefusalFeatureATModule, SafetyDataModule
from lit_safety.methods.refat import ablate_rows, last_prompt_mask


def test_ablation_removes_the_direction_on_the_marked_rows_only():
    h = torch.tensor([[[3.0, 4.0], [1.0, -2.0]], [[3.0, 4.0], [0.0, 5.0]]])
    direction = torch.tensor([0.6, 0.8])  # unit
    out = ablate_rows(h, direction, torch.tensor([True, False]))
    # [3, 4] . d = 5 -> [3, 4] - 5 d = [0, 0]; [1, -2] . d = -1 -> [1.6, -1.2]
    assert torch.allclose(out[0], torch.tensor([[0.0, 0.0], [1.6, -1.2]]))
    assert torch.equal(out[1], h[1])
    assert torch.allclose(out[0] @ direction, torch.zeros(2), atol=1e-6)


def test_the_feature_is_read_at_each_prompts_last_token():
    prompt = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert last_prompt_mask({"prompt_mask": prompt}).nonzero().tolist() == [[0, 2], [1, 1]]


def _module(**kwargs):
    module = RefusalFeatureATModule(refresh_interval=1, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), **kwargs)
    data = SafetyDataModule(batch_size=8, val_fraction=0.0)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    return module, data, trainer


def test_refusal_features_are_the_unit_mean_difference_on_the_current_model():
    module, data, trainer = _module()
    module.configure_model()
    data.tokenizer_name = "organism"
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    harmful, benign = batch["harmful"]["refusal"], batch["benign"]["completion"]
    layers = module._layers()
    directions = module.refusal_features(harmful, benign, layers)
    with torch.no_grad():
        states_h = module.model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"],
                                output_hidden_states=True).hidden_states
        states_b = module.model(input_ids=benign["input_ids"], attention_mask=benign["attention_mask"],
                                output_hidden_states=True).hidden_states
    for layer in layers[:-1]:  # hidden_states[i + 1] is decoder layer i's output (the last one is normed)
        mean_h = states_h[layer + 1][last_prompt_mask(harmful)].mean(0)
        mean_b = states_b[layer + 1][last_prompt_mask(benign)].mean(0)
        expected = (mean_h - mean_b) / (mean_h - mean_b).norm()
        assert torch.allclose(directions[layer], expected, atol=1e-5), layer


def _ablated_refusal_loss_after(steps: int, probability: float) -> float:
    """The refusal loss with every harmful example's refusal feature ablated (measured on one fixed
    batch, the features measured on the model then), after ``steps`` of training."""
    L.seed_everything(0)  # the fresh LoRA A weights are drawn from torch's global generator
    module, data, _ = _module(ablation_probability=probability)
    module.configure_model()
    data.tokenizer_name = "organism"
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    if steps:
        L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0).fit(module, data)
    module.directions = module.refusal_features(batch["harmful"]["refusal"], batch["benign"]["completion"],
                                                module._layers())
    module.eval()
    with torch.no_grad():
        return module.compute_losses(batch)["loss_refusal"].item()  # eval: every harmful row ablated


def test_a_short_run_teaches_refusal_under_ablation():
    before, after = _ablated_refusal_loss_after(0, 1.0), _ablated_refusal_loss_after(40, 1.0)
    assert after < 0.95 * before, (before, after)  # a modest bar: the tiny organism learns slowly
