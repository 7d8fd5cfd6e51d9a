"""Adversaries that act on the residual stream from inside ``training_step``.

Their tensors are plain leaf tensors held outside the module tree: never module parameters, never
seen by the outer optimizer or written to checkpoints, and no DDP unused-parameter errors. Their
gradients come from ``torch.autograd.grad`` so nothing leaks into the LoRA ``.grad`` buffers. They
enter the forward pass through hooks that are removed in a ``finally``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from lit_safety.backbone import decoder_layers, resolve_layers


def _replace_output(output, new: Tensor):
    return (new, *output[1:]) if isinstance(output, tuple) else new


def _output_tensor(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def edit_layer_output(model, layer: int, edit: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block, decoder layer ``layer``'s output h is replaced by ``edit(h)``."""
    stack = decoder_layers(model)
    (index,) = resolve_layers([layer], len(stack))
    handle = stack[index].register_forward_hook(
        lambda _module, _args, output: _replace_output(output, edit(_output_tensor(output)))
    )
    try:
        yield
    finally:
        handle.remove()


class ResidualAttack:
    """The hard-negative miner of the triplet defense (2506.11938, Sec. 3.3): a linear residual module
    h -> h + W h + b inserted after one decoder layer. W and b start at zero, so the module starts as
    the identity; it is trained to make the (frozen) model produce harmful completions, and the
    harmful states it induces serve as hard negatives.

    Args:
        hidden_size: width of the residual stream (read from the model, never hard-coded).
        layer: decoder layer after which the module acts.
        device, dtype: placement of W and b (match the model).
    """

    def __init__(self, hidden_size: int, layer: int, device=None, dtype=torch.float32):
        self.layer = layer
        self.weight = torch.zeros(hidden_size, hidden_size, device=device, dtype=dtype, requires_grad=True)
        self.bias = torch.zeros(hidden_size, device=device, dtype=dtype, requires_grad=True)

    @classmethod
    def for_model(cls, model, layer: int) -> "ResidualAttack":
        reference = next(p for p in model.parameters() if p.is_floating_point())
        hidden = model.get_input_embeddings().weight.shape[-1]
        return cls(hidden, layer, reference.device, torch.float32)

    def parameters(self) -> list[Tensor]:
        return [self.weight, self.bias]

    def __call__(self, h: Tensor) -> Tensor:
        return h + (h.float() @ self.weight.T + self.bias).to(h.dtype)

    def attached(self, model):
        """Context in which the module sits in ``model``'s forward path."""
        return edit_layer_output(model, self.layer, self)

    def train(self, loss_fn: Callable[[], Tensor], steps: int, lr: float) -> list[float]:
        """Adam on (W, b) for ``steps`` steps minimising ``loss_fn()`` (run with the module attached
        by the caller); returns the loss at every step. Gradients reach only W and b."""
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        losses = []
        for _ in range(steps):
            loss = loss_fn()
            grads = torch.autograd.grad(loss, self.parameters())
            for p, g in zip(self.parameters(), grads):
                p.grad = g
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses
