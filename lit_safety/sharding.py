"""The model under FSDP (Lightning's ``FSDPStrategy``) and FSDP2 (``ModelParallelStrategy``).

Sharding wraps or swaps what the rest of the library reaches through ``module.model``: FSDP wraps
modules (parameter names gain ``_fsdp_wrapped_module.``), FSDP2 turns parameters into DTensor
shards. Everything that must see whole adapter weights or their plain names goes through here.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from lit_safety import backbone

_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter's name as the unwrapped model spells it (what checkpoints and peft use)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _fsdp1(root: nn.Module | None) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return root is not None and any(isinstance(m, FullyShardedDataParallel) for m in root.modules())


def fully_shard_model(model: nn.Module, mesh) -> None:
    """Apply FSDP2 to a PeftModel over the data-parallel ``mesh``: one unit per decoder layer, and
    the embeddings, final norm and head in the root unit.

    Adapters whose dtype differs from their layer's (fp32 LoRA beside a bf16 base) get units of their
    own, since one unit all-gathers one dtype.
    """
    from torch.distributed.fsdp import fully_shard

    for layer in backbone.decoder_layers(model):
        dtypes = {p.dtype for p in layer.parameters()}
        if len(dtypes) > 1:
            for module in layer.modules():
                if any(p.requires_grad for p in module.parameters(recurse=False)):
                    fully_shard(module, mesh=mesh)
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_trainable_state(model: nn.Module, root: nn.Module | None = None) -> dict[str, Tensor]:
    """Every trainable (adapter) weight of ``model`` in full, keyed by its unwrapped name, on every
    rank (a collective call: every rank must make it). ``root``: the strategy's wrapped module,
    under FSDP the one whose parameters can be gathered."""
    gather = contextlib.nullcontext()
    if _fsdp1(root):
        from torch.distributed.fsdp import FullyShardedDataParallel

        device = next(root.parameters()).device
        gather = FullyShardedDataParallel.summon_full_params(root, writeback=False, offload_to_cpu=device.type != "cpu")
    with gather, torch.no_grad():
        state = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                state[clean_name(name)] = full.detach().cpu().clone()
        return state
