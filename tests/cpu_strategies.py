"""Lightning's sharded strategies on CPU processes (gloo), for the distributed tests only.

Two CPU-only quirks of ``FSDPStrategy``, neither on the GPU path: it passes ``device_id=None`` (a CPU
device has no index), for which FSDP looks for an accelerator; and its full state dicts offload to
the CPU, which on CPU tensors frees storage still in use. And one for the float64 the distributed
tests train in (so that only the order of sums separates two processes from one): at "32-true"
Lightning's FSDP precision casts the module to float32 and gives FSDP a float32 policy; here the
parameters keep their dtype. ``ModelParallelStrategy`` (FSDP2) runs on CPU as it is.
"""

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, OptimStateKeyType, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP


def _full_state(module):
    return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=False, rank0_only=False),
                                FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=False))


class _OwnDtypePrecision(FSDPPrecision):
    def convert_module(self, module):
        return module

    @property
    def mixed_precision_config(self):
        return None


def _set_precision(strategy, plugin):
    if isinstance(plugin, FSDPPrecision) and plugin.precision == "32-true":
        plugin = _OwnDtypePrecision("32-true")
    FSDPStrategy.precision_plugin.fset(strategy, plugin)


class CPUFSDPStrategy(FSDPStrategy):
    precision_plugin = property(FSDPStrategy.precision_plugin.fget, _set_precision)

    def _setup_model(self, model):
        model = FSDP(module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                     sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    def lightning_module_state_dict(self):
        with _full_state(self.model):
            return self.model.state_dict()

    def optimizer_state(self, optimizer):
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        with _full_state(self.model):
            state = FSDP.optim_state_dict(self.model, optimizer)
            return FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
