"""Run by ``test_sharded.py`` under torchrun (2 CPU processes): every method's fit from its shipped
config under one strategy, and a checkpoint-and-resume, in one process group.

Every rank writes ``<out>/<run>/rank<r>.pt``: the full adapter weights it ends with (gathered from the
shards) and, on a fixed batch, how far the reference view (adapters off) is from the base model it
was built from, and how far the trained view is from it.

    python -m torch.distributed.run --nproc-per-node=2 tests/sharded_run.py OUT STRATEGY RUNS_JSON
"""

import json
import os
import sys

import lightning as L
import torch

from lit_safety import backbone, sharding
from lit_safety.cli import main


class Probe(L.Callback):
    """At the end of fit, on every rank: gathered adapters and the reference-view check."""

    def __init__(self, out: str):
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
        base = backbone.load_causal_lm(pl_module.hparams.base_model, "float32", None).eval()
        with torch.no_grad():
            expected = base(input_ids=ids).logits

        def views():
            with pl_module.reference():
                reference = pl_module.model(input_ids=ids).logits
            with torch.no_grad():
                trained = pl_module.model(input_ids=ids).logits
            return reference, trained

        pl_module._probe = views  # run inside the wrapped forward, as training_step is
        reference, trained = pl_module._in_forward("_probe")
        state = sharding.full_trainable_state(pl_module.model, trainer.strategy.model)
        os.makedirs(self.out, exist_ok=True)
        torch.save({"adapters": state, "reference_gap": (reference - expected).abs().max().item(),
                    "trained_gap": (trained - expected).abs().max().item()},
                   os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


STRATEGIES = {
    "ddp": ["--trainer.strategy=ddp"],
    "fsdp": ["--trainer.strategy=cpu_strategies.CPUFSDPStrategy", "--trainer.strategy.dict_kwargs.use_orig_params=true",
             "--trainer.strategy.auto_wrap_policy=[transformers.models.llama.modeling_llama.LlamaDecoderLayer]"],
    "fsdp2": ["--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
              "--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=1"],
}


if __name__ == "__main__":
    out, strategy, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    for name, args in runs.items():
        main(["fit", *args, *STRATEGIES[strategy], "--trainer.devices=2",
              "--trainer.callbacks+=sharded_run.Probe", f"--trainer.callbacks.out={os.path.join(out, name)}"])
