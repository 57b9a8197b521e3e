"""Small pieces of per-step state the base callback keeps: random state, clean gradients."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["CleanGradientWeight", "RandomState"]


@dataclass
class RandomState:
    """The CPU (and current CUDA device's) generator state at the start of a clean pass."""

    cpu: Tensor
    cuda: Tensor | None = None
    cuda_index: int = 0

    @classmethod
    def capture(cls, device: torch.device) -> RandomState:
        if device.type != "cuda":
            return cls(cpu=torch.get_rng_state())
        index = device.index if device.index is not None else torch.cuda.current_device()
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state(index), index)

    @contextmanager
    def replayed(self) -> Iterator[None]:
        """Run a block from this state, then put back the state the block started from."""
        devices = [self.cuda_index] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_index)
            yield


class CleanGradientWeight:
    """Multiplies this micro-batch's clean gradient by ``weight`` inside ``.grad``.

    ``.grad`` may already hold earlier micro-batches of an accumulation window; those are
    copied before the clean backward (only then, and only when ``weight != 1``) so that
    ``.grad = earlier + weight * clean`` afterwards.
    """

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self._earlier: list[tuple[nn.Parameter, Tensor | None]] = []

    def before_backward(self, module: nn.Module) -> None:
        self._earlier = [
            (p, None if p.grad is None else p.grad.detach().clone())
            for p in module.parameters()
            if p.requires_grad
        ]

    def after_backward(self) -> None:
        with torch.no_grad():
            for param, earlier in self._earlier:
                if param.grad is None:
                    continue
                if earlier is None:
                    param.grad.mul_(self.weight)
                else:
                    param.grad.sub_(earlier).mul_(self.weight).add_(earlier)
        self._earlier = []
