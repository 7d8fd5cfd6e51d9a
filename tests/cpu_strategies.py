"""Lightning's sharded strategies on CPU processes (gloo), for the distributed tests only.

Two CPU-only quirks of ``FSDPStrategy``, neither on the GPU path: it passes ``device_id=None`` (a CPU
device has no index), for which FSDP looks for an accelerator; and its full state dicts offload to
the CPU, which on CPU tensors frees storage still in use. And one for the float64 the distributed
tests train in: Lightning's full-precision policy casts parameters to float32, so at "32-true" no
policy is given (FSDP keeps the parameters' dtype). ``ModelParallelStrategy`` (FSDP2) runs on CPU as
it is.
"""

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, OptimStateKeyType, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP


def _full_state(module):
    return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=False, rank0_only=False),
                                FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=False))


class CPUFSDPStrategy(FSDPStrategy):
    @property
    def mixed_precision_config(self):
        return None if self.precision_plugin.precision == "32-true" else super().mixed_precision_config

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
