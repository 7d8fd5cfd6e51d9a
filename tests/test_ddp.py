import os
import subprocess
import sys

import pytest
import torch

# LAT runs its adversary's inner loop inside training_step: DDP must still see one clean backward.
EXTRA = {"refusal_sft.yaml": [], "lat.yaml": ["--model.adversary.layers=[0, 1]", "--model.adversary.steps=2"]}


@pytest.mark.parametrize("config_name", EXTRA)
def test_ddp_on_two_cpu_processes_keeps_adapters_identical(tiny_args, tmp_path, config_name):
    config = os.path.join(os.path.dirname(__file__), "..", "configs", config_name)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [sys.executable, "-m", "lit_safety", "fit", "--config", config, *tiny_args,
            "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
            "--trainer.callbacks+=ddp_dump.DumpAdapters", f"--trainer.callbacks.out_dir={tmp_path}",
            *EXTRA[config_name]]
    args = [a for a in args if a != "--trainer.devices=1"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and rank0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # The adapters did train: LoRA B starts at zero.
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora_B" in k)
