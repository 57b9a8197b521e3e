"""The view of one attacked training step that a method's ``attack`` works with."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_adv.embedding import EmbeddingCall, OutputSpace, WeightRowSpace
from lightning_adv.functional import relative_sizes, row_norms

__all__ = ["AttackStep", "Forward", "parse_loss_output"]


def parse_loss_output(output: Any, loss_fn: str) -> tuple[Tensor, Tensor | None]:
    """``(loss, logits)`` from what a loss method returned: a tensor, a mapping or an object."""
    if isinstance(output, Tensor):
        return output, None
    if isinstance(output, Mapping):
        loss, logits = output.get("loss"), output.get("logits")
    else:
        loss, logits = getattr(output, "loss", None), getattr(output, "logits", None)
    if not isinstance(loss, Tensor):
        raise RuntimeError(
            f"`{loss_fn}` returned {type(output).__name__} without a loss tensor. Return the "
            "loss as a tensor, a dict with a 'loss' tensor, or an object with a `.loss` "
            "tensor (a Hugging Face model output called with labels)."
        )
    return loss, logits if isinstance(logits, Tensor) else None


@dataclass
class Forward:
    """One forward pass under a perturbation: its loss, its logits, and its embedding calls."""

    loss: Tensor
    raw_logits: Tensor | None
    calls: list[EmbeddingCall]
    loss_fn: str

    @property
    def logits(self) -> Tensor:
        if self.raw_logits is None:
            raise RuntimeError(
                f"This method needs the model's logits, but `{self.loss_fn}` returned only a "
                "loss. Return a dict {'loss': loss, 'logits': logits} (or a Hugging Face "
                "output, which has both) from that method."
            )
        return self.raw_logits


class AttackStep:
    """What a method sees of one attacked micro-batch.

    Perturbations are 2-D tensors of shape ``(examples, features)``: one row per example
    for ``target="output"``, a single row for ``target="weight"``. ``clean_gradient`` is
    this micro-batch's own loss gradient in that shape, padding entries zero.

    Args:
        space: where perturbations go (rows of the weight, or the embedding output).
        calls: the embedding calls of the clean pass, with their output gradients.
        run_loss: runs the loss method once under the current perturbation.
        backward: backpropagates an adversarial loss the way the clean loss was.
        scale: multiplies a loss before ``torch.autograd.grad`` (the AMP loss scale).
        replay: context manager that replays the clean pass's random state.
        loss_fn: the loss method's name, for messages.
        epsilon_scale: ``"absolute"`` or ``"relative"``: how budgets are read.
    """

    def __init__(
        self,
        space: OutputSpace | WeightRowSpace,
        calls: list[EmbeddingCall],
        run_loss: Callable[[], Any],
        backward: Callable[[Tensor], None],
        scale: Callable[[Tensor], Tensor],
        replay: Callable[[], AbstractContextManager[None]] | None,
        loss_fn: str,
        epsilon_scale: str = "absolute",
    ) -> None:
        self.space = space
        self.epsilon_scale = epsilon_scale
        self._reference: Tensor | None = None
        self.clean_calls = calls
        self._run_loss = run_loss
        self._backward = backward
        self._scale = scale
        self._replay = replay
        self._loss_fn = loss_fn
        self.dtype = torch.promote_types(calls[0].output.dtype, torch.float32)
        grads = [
            call.grad if call.grad is not None else torch.zeros_like(call.output)
            for call in calls
        ]
        self.clean_gradient = space.gradient(grads, self.dtype)
        self.adversarial_loss: Tensor | None = None
        self.perturbation: Tensor | None = None
        self.classes: int | None = None

    def zeros(self) -> Tensor:
        return torch.zeros_like(self.clean_gradient)

    def mask(self, r: Tensor) -> Tensor:
        """Zero the entries of ``r`` that belong to padding."""
        return self.space.mask(r)

    @property
    def reference(self) -> Tensor:
        """What is perturbed, in perturbation shape: each example's clean embedding output,
        or the touched rows of the weight; padding zeroed."""
        if self._reference is None:
            self._reference = self.space.reference(self.dtype)
        return self._reference

    def l2_budget(self, value: float) -> float | Tensor:
        """An L2 radius or step size: ``value`` itself, or with ``epsilon_scale="relative"``,
        ``value`` times each row's norm of what is perturbed (shape ``(examples, 1)``)."""
        if self.epsilon_scale == "absolute":
            return value
        return value * row_norms(self.reference)

    def entry_budget(self, value: float) -> float | Tensor:
        """A per-entry size (sign steps, L-infinity balls): ``value`` itself, or with
        ``epsilon_scale="relative"``, ``value`` times the root-mean-square entry of what is
        perturbed, per row."""
        if self.epsilon_scale == "absolute":
            return value
        entries = self.space.keep.sum(dim=1, keepdim=True) if self.space.keep is not None \
            else torch.full_like(self.reference[:, :1], self.reference.shape[1])
        return value * row_norms(self.reference) / entries.clamp_min(1).to(self.dtype).sqrt()

    def relative_sizes(self, r: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, largest)`` size of ``r`` relative to what it perturbs; see
        :func:`lightning_adv.functional.relative_sizes`."""
        return relative_sizes(r.to(self.dtype), self.reference, self.space.hidden)

    @contextmanager
    def forward_at(self, r: Tensor) -> Iterator[Forward]:
        """Run the loss method with ``r`` applied; ``r`` stays applied until the block ends,
        so a backward inside the block sees the perturbed weights."""
        replay = self._replay() if self._replay is not None else nullcontext()
        with self.space.applied(r) as calls:
            with replay:
                output = self._run_loss()
            loss, logits = parse_loss_output(output, self._loss_fn)
            if logits is not None:
                self.classes = logits.shape[-1]
            yield Forward(loss=loss, raw_logits=logits, calls=calls, loss_fn=self._loss_fn)

    def perturbation_gradient(self, value: Tensor, forward: Forward) -> Tensor:
        """Gradient of ``value`` with respect to the perturbation of ``forward``, in the
        shape of a perturbation. Parameters' ``.grad`` are not touched."""
        outputs = [call.output for call in forward.calls]
        grads = torch.autograd.grad(
            self._scale(value), outputs, allow_unused=True, materialize_grads=True
        )
        return self.space.gradient(list(grads), self.dtype)

    def gradient_at(self, r: Tensor) -> Tensor:
        """Gradient of the loss at ``r`` with respect to the perturbation only."""
        with self.forward_at(r) as forward:
            return self.perturbation_gradient(forward.loss, forward)

    def backward(self, value: Tensor, perturbation: Tensor) -> None:
        """Backpropagate ``adv_weight * value`` into every parameter's ``.grad``, scaled like
        the clean loss (gradient accumulation, AMP loss scale) and all-reduced under DDP."""
        self._backward(value)
        self.adversarial_loss = value.detach()
        self.perturbation = perturbation.detach()

    def backward_at(self, r: Tensor) -> Tensor:
        """One forward at ``r`` and a full backward of the adversarial loss; returns it."""
        with self.forward_at(r) as forward:
            self.backward(forward.loss, r)
            return forward.loss.detach()
