"""A callback for the DDP test: every rank writes its adapter weights at the end of fit."""

import os

import lightning as L
import torch


class DumpAdapters(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module):
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save(state, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))
