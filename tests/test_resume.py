"""Resume is exact: a run interrupted after a checkpoint and resumed from it ends with the adapter
weights of an uninterrupted run, for every method (data order, random streams, the miner and the
calibration all come back from the checkpoint)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_safety import CircuitBreakerModule, RefusalSFTModule, SafetyDataModule, TargetedLATModule, TripletDefenseModule
from lit_safety.methods import LATAdversary
from lit_safety.methods.lat_objectives import DPO, RMU, GradientAscent

STEPS, CHECKPOINT_AT, CRASH_AT = 8, 4, 6
METHODS = {
    "refusal_sft": lambda: RefusalSFTModule(lora_dropout=0.1),
    "triplet_mining": lambda: TripletDefenseModule(layers_benign=[1], layers_harmful=[1], mining=True,
                                                   mining_interval=3, mining_steps=2, mining_layers=[0]),
    "lat_refusal": lambda: TargetedLATModule(adversary=LATAdversary(layers=[0], steps=2, tokens=3)),
    "lat_dpo": lambda: TargetedLATModule(objective=DPO(), adversary=LATAdversary(layers=[0], steps=2)),
    "lat_rmu": lambda: TargetedLATModule(objective=RMU(layer=1), adversary=LATAdversary(layers=[0], steps=2)),
    "lat_gradient_ascent": lambda: TargetedLATModule(objective=GradientAscent(),
                                                     adversary=LATAdversary(layers=[0], steps=2)),
    "circuit_breaker": lambda: CircuitBreakerModule(layers=[0, 1], lora_dropout=0.1),
}


class Crashed(Exception):
    pass


class Crash(L.Callback):
    """Stops the run at a step after the last checkpoint: its work since then is lost."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == CRASH_AT:
            raise Crashed


def fit(module, root, callbacks=(), ckpt_path=None, max_steps=STEPS, checkpoint=None):
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, val_check_interval=CHECKPOINT_AT,
                        limit_val_batches=1, num_sanity_val_steps=1, callbacks=list(callbacks))
    trainer.checkpoint_callback.save_last = True
    # 12 harmful and 24 benign + borderline records of batch 4: epochs of 6 steps, so the resume
    # lands mid-epoch and the shorter stream is into its second pass.
    # Modules built in Python keep their component objects in the hyperparameters: not weights only.
    trainer.fit(module, SafetyDataModule(batch_size=4, val_fraction=0.1), ckpt_path=ckpt_path, weights_only=False)
    if checkpoint is not None:
        trainer.save_checkpoint(checkpoint)  # as the CLI writes last.ckpt when fit ends
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", METHODS)
def test_resumed_run_equals_an_uninterrupted_one(name, tmp_path):
    straight = fit(METHODS[name](), tmp_path / "straight")
    with pytest.raises(Crashed):
        fit(METHODS[name](), tmp_path / "interrupted", callbacks=[Crash()])
    checkpoint = next((tmp_path / "interrupted").glob("**/last.ckpt"))
    assert torch.load(checkpoint, weights_only=False)["global_step"] == CHECKPOINT_AT
    resumed = fit(METHODS[name](), tmp_path / "resumed", ckpt_path=str(checkpoint))
    difference = max((straight[k] - resumed[k]).abs().max().item() for k in straight)
    assert difference <= 1e-6, difference


@pytest.mark.parametrize("name", ["refusal_sft", "triplet_mining"])
def test_a_finished_run_continued_from_its_last_checkpoint_equals_a_longer_one(name, tmp_path):
    # The run stops at max_steps mid-epoch; Lightning records that epoch as finished, the data order
    # must not skip the rest of it.
    straight = fit(METHODS[name](), tmp_path / "straight")
    checkpoint = tmp_path / "finished.ckpt"
    fit(METHODS[name](), tmp_path / "short", max_steps=CRASH_AT - 1, checkpoint=checkpoint)
    continued = fit(METHODS[name](), tmp_path / "continued", ckpt_path=str(checkpoint))
    difference = max((straight[k] - continued[k]).abs().max().item() for k in straight)
    assert difference <= 1e-6, difference
