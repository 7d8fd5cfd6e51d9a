import lightning as L
import pytest

from lit_safety import CircuitBreakerModule, SafetyDataModule


def test_schedule_counts_optimizer_steps_not_micro_batches():
    module = CircuitBreakerModule(layers=[0, 1], coefficient_scale=10.0)
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.coefficients())

    trainer = L.Trainer(max_steps=4, accumulate_grad_batches=2, accelerator="cpu", logger=False, callbacks=[Record()],
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(module, SafetyDataModule(batch_size=2, val_fraction=0.0))
    assert len(seen) == 8  # micro-batches
    # t = 0, 0, 1, 1, 2, 2, 3, 3 optimizer steps of T = 4: c_retain = a * t / 8
    assert [round(c, 4) for c, _ in seen] == [0.0, 0.0, 1.25, 1.25, 2.5, 2.5, 3.75, 3.75]
    assert all(c_retain + c_cb == pytest.approx(10.0) for c_retain, c_cb in seen)


def test_rerouting_has_a_gradient_from_the_first_step():

    module = CircuitBreakerModule(layers=[0, 1])
    module.configure_model()
    data = SafetyDataModule(batch_size=4, val_fraction=0.0, tokenizer="organism")
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.train()
    module.compute_losses(batch)["loss_reroute"].backward()
    grads = [p.grad.abs().sum() for n, p in module.named_parameters() if "lora_" in n and p.grad is not None]
    assert grads and sum(grads) > 0
    with pytest.raises(ValueError, match="init_noise must be > 0"):
        CircuitBreakerModule(init_noise=0.0)
