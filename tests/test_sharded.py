"""DDP, FSDP and FSDP2 on two CPU processes: every method ends with the adapters single-process
training reaches on the same global batch, the reference view is the base model on every rank, a
checkpoint resumes every rank's shard, and the adapter export holds the whole adapter."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import tiny_cli_args
from safetensors.torch import load_file
from sharded_run import STRATEGIES

from lit_safety.artifacts import read_checkpoint
from lit_safety.cli import main

HERE = os.path.dirname(__file__)
CONFIGS = os.path.join(HERE, "..", "configs")
STEPS = 3
# Settings under which one process and two take the same steps: no validation hold-out (the 12
# records then split evenly), no dropout (its masks are drawn per process); the inner loops cut to a
# test's budget. The mined share, 0.3, is no whole number of a rank's examples: ranks mine the rows
# one process would.
# In float64, which losses and adversaries keep, so that what remains is the order of floating-point
# sums alone (in float32, Adam's normalisation lifts that order's 1e-7 to 1e-5 in coordinates whose
# gradient is near zero).
SAME_STEPS = ["--data.val_fraction=0", "--model.lora_dropout=0", "--model.dtype=float64"]
METHODS = {
    "refusal_sft": [],
    "refat": ["--model.ablation_probability=0.5"],
    "triplet_adv": ["--model.mining_fraction=0.3", "--model.mining_steps=3", "--model.mining_interval=2"],
    "triplet_latent": ["--model.mining_fraction=0.3", "--model.mining_steps=2"],
    "triplet_suffix": ["--model.mining_fraction=0.3", "--model.mining_steps=2", "--model.mining_suffix_init=ok"],
    # Both miners within the 3 steps (mining_seed 0 draws suffix, latent, suffix).
    "triplet_latent_suffix": ["--model.mining_fraction=0.3", "--model.mining_steps=2", "--model.mining_suffix_init=ok"],
    "triplet_lat": ["--model.mining_fraction=0.3", "--model.mining_steps=2", "--model.mining_suffix_init=ok"],
    "lat": ["--model.adversary.layers=[0, 1]", "--model.adversary.steps=2"],
    "lat_suffix": ["--model.adversary.steps=2", "--model.adversary.suffix_init=ok"],
    # Every step clipped: the norm must be the whole model's, not a shard's, to train like one process.
    "circuit_breaker": ["--trainer.gradient_clip_val=0.01"],
}
TOLERANCE = 1e-9  # relative, per adapter tensor
# Refused under FSDP (one backward per forward).
INNER_LOOP = ("lat", "lat_suffix", "triplet_adv", "triplet_latent", "triplet_suffix", "triplet_latent_suffix",
              "triplet_lat")



# The paper-scale recipes as shipped (FSDP2, bf16 weights, bf16-mixed where bf16 is fast, activation checkpointing, the
# global batch), on the tiny model: only its layers, the steps and the batch are cut to fit.
TRIPLET_LAYERS = ["--model.layers_benign=[2, 3]", "--model.layers_harmful=[2, 3]", "--model.mining_layers=[0, 1]",
                  "--model.mining_steps=2", "--model.mining_interval=1"]
PAPER_SCALE = {
    "llama3_8b/triplet_paper": TRIPLET_LAYERS,
    "llama3_8b/triplet_released": TRIPLET_LAYERS,
    "llama3_8b/circuit_breaker": ["--model.layers=[1, 2]"],
    "llama3_8b/lat_jailbreak": ["--model.adversary.layers=[embedding, 1, 2]", "--model.adversary.steps=2"],
    "llama3_8b/refat": ["--model.refresh_interval=1"],
}


def _paper_scale_args(tiny_args, config: str, logs: str) -> list[str]:
    args = [a for a in tiny_args if not a.startswith(("--trainer.devices", "--data.batch_size"))]
    return ["--config", os.path.join(CONFIGS, f"{config}.yaml"), *args, *PAPER_SCALE[config], "--trainer.max_steps=1",
            "--data.global_batch_size=8", f"--trainer.default_root_dir={logs}", f"--trainer.logger.init_args.save_dir={logs}"]


def _args(tiny_args, method: str, logs: str, steps: int = STEPS) -> list[str]:
    args = [a for a in tiny_args if not a.startswith(("--trainer.devices", "--trainer.default_root_dir",
                                                        "--trainer.logger.init_args.save_dir"))]
    return ["--config", os.path.join(CONFIGS, f"{method}.yaml"), *args, *SAME_STEPS, *METHODS[method],
            f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={logs}", f"--trainer.logger.init_args.save_dir={logs}"]


def _relative_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in a)


@pytest.fixture(scope="module")
def tiny_args_module(tiny_model_dir, data_files, tmp_path_factory):
    return tiny_cli_args(tiny_model_dir, data_files, tmp_path_factory.mktemp("logs"))


@pytest.fixture(scope="module")
def single_process(tiny_args_module, tmp_path_factory):
    """Adapters after STEPS steps in one process with both ranks' batches (2 x 4 records a stream)."""
    out = tmp_path_factory.mktemp("single")
    for method in METHODS:
        main(["fit", *_args(tiny_args_module, method, str(out / f"{method}_logs")), "--data.batch_size=8",
              "--trainer.devices=1", "--trainer.callbacks+=sharded_run.Probe",
              f"--trainer.callbacks.out={out / method}"])
    return {method: torch.load(out / method / "rank0.pt") for method in METHODS}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(strategy: str, runs: dict, out) -> None:
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           f"--master-port={_free_port()}",
                           os.path.join(HERE, "sharded_run.py"), str(out), strategy, json.dumps(runs)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp2"])
def test_two_processes_train_like_one(strategy, tiny_args_module, single_process, tmp_path):
    # Refused under FSDP: see the next test.
    methods = [m for m in METHODS if not (strategy == "fsdp" and m in INNER_LOOP)]
    runs = {method: _args(tiny_args_module, method, str(tmp_path / f"{method}_logs")) for method in methods}
    # Checkpoint and resume: the mining triplet run (ReFAT's under FSDP) also checkpoints at step 2; a
    # second run resumes there.
    resumable = "triplet_adv" if "triplet_adv" in methods else "refat"
    every = tmp_path / "every"
    runs[resumable] += ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                            "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.save_top_k=-1",
                            f"--trainer.callbacks.dirpath={every}"]
    step2 = every / "epoch=0-step=2.ckpt"  # a file, or under FSDP2 a directory of shards
    runs["resumed"] = [*_args(tiny_args_module, resumable, str(tmp_path / "resumed_logs")), f"--ckpt_path={step2}"]
    if strategy == "fsdp2":
        runs.update({config: _paper_scale_args(tiny_args_module, config, str(tmp_path / "paper_logs"))
                     for config in PAPER_SCALE})
    _launch(strategy, runs, tmp_path)

    for method in methods:
        ranks = [torch.load(tmp_path / method / f"rank{r}.pt") for r in (0, 1)]
        for rank in ranks:
            assert rank["reference_gap"] < 1e-5, (method, rank["reference_gap"])
            assert rank["trained_gap"] > 1e-4, method  # the adapters did change the model
            assert _relative_gap(rank["adapters"], single_process[method]["adapters"]) < TOLERANCE, method
        assert _relative_gap(ranks[0]["adapters"], ranks[1]["adapters"]) == 0.0, method
        exported = load_file(tmp_path / f"{method}_logs" / method / "version_0" / "adapter" / "adapter_model.safetensors")
        gathered = {k.replace(".default.", "."): v for k, v in ranks[0]["adapters"].items()}
        assert exported.keys() == gathered.keys()
        assert all(torch.equal(exported[k], gathered[k]) for k in gathered), method

    uninterrupted = torch.load(tmp_path / resumable / "rank0.pt")["adapters"]
    for r in (0, 1):
        resumed = torch.load(tmp_path / "resumed" / f"rank{r}.pt")["adapters"]
        assert _relative_gap(resumed, uninterrupted) < TOLERANCE
    for config in PAPER_SCALE if strategy == "fsdp2" else ():
        trained = torch.load(tmp_path / config / "rank0.pt")
        assert trained["trained_gap"] > 0 and all(v.dtype == torch.float32 for v in trained["adapters"].values()), config
    at_step2 = {k.removeprefix("model."): v for k, v in read_checkpoint(str(step2))["state_dict"].items()}
    assert _relative_gap(at_step2, uninterrupted) > 1e-3  # the resumed run had a step to take


@pytest.mark.parametrize("method", INNER_LOOP)
def test_inner_adversary_loops_under_fsdp_are_refused_before_training(method, tiny_args, tmp_path):
    # Their backward passes break FSDP's per-forward hook state (the update is 0.07-0.3 off).
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_args(tiny_args, method, str(tmp_path)), *STRATEGIES["fsdp"], "--trainer.max_steps=1"])
    assert "under FSDPStrategy: its inner adversary loop" in str(exit_info.value).splitlines()[0]
