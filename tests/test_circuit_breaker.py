import lightning as L
import pytest

from lit_safety import CircuitBreakerModule, SafetyDataModule


def test_schedule_counts_optimizer_steps_not_micro_batches():
    module = CircuitBreakerModule(layers=[0, 1], alpha=10.0, lora_dropout=0.05)
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.coefficients())

    trainer = L.Trainer(max_steps=4, accumulate_grad_batches=2, accelerator="cpu", logger=False, callbacks=[Record()],
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(module, SafetyDataModule(batch_size=2, val_fraction=0.0))
    assert len(seen) == 8  # micro-batches
    # t = 0, 0, 1, 1, 2, 2, 3, 3 optimizer steps of T = 4: c_retain = alpha * t / 8
    assert [round(c, 4) for c, _ in seen] == [0.0, 0.0, 1.25, 1.25, 2.5, 2.5, 3.75, 3.75]
    assert all(c_retain + c_cb == pytest.approx(10.0) for c_retain, c_cb in seen)


def test_without_dropout_training_could_never_start():
    module = CircuitBreakerModule(layers=[0, 1])
    with pytest.raises(ValueError, match="needs lora_dropout > 0"):
        module.configure_model()
