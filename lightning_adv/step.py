"""The view of one attacked training step that a method's ``attack`` works with."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_adv.embedding import EmbeddingCall, OutputSpace, WeightRowSpace
from lightning_adv.functional import relative_sizes, row_norms

__all__ = ["AttackStep", "Forward", "parse_loss_output"]

Space = OutputSpace | WeightRowSpace


def parse_loss_output(output: Any) -> tuple[Tensor | None, Tensor | None]:
    """``(loss, logits)`` from what a loss method returned: a tensor, a mapping or an object."""
    if isinstance(output, Tensor):
        return output, None
    if isinstance(output, Mapping):
        loss, logits = output.get("loss"), output.get("logits")
    else:
        loss, logits = getattr(output, "loss", None), getattr(output, "logits", None)
    return (
        loss if isinstance(loss, Tensor) else None,
        logits if isinstance(logits, Tensor) else None,
    )


def _missing(what: str, forward: Forward, shape: str) -> RuntimeError:
    other = (
        "" if forward.loss_fn == "compute_loss"
        else ", or pass `loss_fn=` naming a method that does, such as 'compute_loss'"
    )
    return RuntimeError(
        f"{forward.prefix}`{forward.loss_fn}` returned {type(forward.output).__name__} "
        f"without {what}. Make it return {shape}{other}."
    )


@dataclass
class Forward:
    """One forward pass under a perturbation: its output and its embedding calls."""

    output: Any
    calls: list[EmbeddingCall]
    loss_fn: str
    #: The callback's class name, which starts every message.
    owner: str = ""

    @property
    def prefix(self) -> str:
        return f"{self.owner}: " if self.owner else ""

    @property
    def loss(self) -> Tensor:
        loss, _ = parse_loss_output(self.output)
        if loss is None:
            raise _missing("a loss tensor", self,
                           "the loss tensor, a dict with 'loss', or an object with `.loss` "
                           "(a Hugging Face model output called with labels has it)")
        if loss.numel() != 1:
            raise RuntimeError(
                f"{self.prefix}`{self.loss_fn}` returned a loss of shape {tuple(loss.shape)}; the "
                "adversarial pass needs one scalar loss for the batch. Reduce it (for "
                "example with `.mean()`) in that method."
            )
        if torch.is_grad_enabled() and not loss.requires_grad:
            raise RuntimeError(
                f"{self.prefix}`{self.loss_fn}` returned a loss without a graph (detached, "
                "a Python number turned into a tensor, or computed under `torch.no_grad()`), "
                "so the adversarial pass has nothing to backpropagate. Return the loss as "
                "computed from the model's output."
            )
        return loss

    @property
    def logits(self) -> Tensor:
        _, logits = parse_loss_output(self.output)
        if logits is None:
            raise _missing("logits, which this method compares", self,
                           "a dict {'loss': loss, 'logits': logits} or an object with "
                           "`.loss` and `.logits` (a Hugging Face model output called with "
                           "labels has both)")
        return logits


class AttackStep:
    """What a method sees of one attacked micro-batch.

    Perturbations are 2-D tensors of shape ``(examples, features)``: one row per example
    for ``target="output"``, a single row for ``target="weight"``. ``clean_gradient`` is
    this micro-batch's own loss gradient in that shape, padding entries zero.

    Args:
        space: where perturbations go; ``None`` for methods that perturb no embedding.
        calls: the embedding calls of the clean pass, with their output gradients.
        run_loss: runs the loss method once.
        backward: backpropagates an adversarial loss the way the clean loss was.
        scale: multiplies a loss before ``torch.autograd.grad`` (the AMP loss scale).
        replay: context manager that replays the clean pass's random state.
        loss_fn: the loss method's name, for messages.
        epsilon_scale: ``"absolute"`` or ``"relative"``: how budgets are read.
        clean_logits: the clean pass's logits if they were captured, else ``None``.
        generator: the callback's random generator, for random starts and noise.
        owner: the callback's class name, which starts error messages.
    """

    def __init__(
        self,
        space: Space | None,
        calls: list[EmbeddingCall],
        run_loss: Callable[[], Any],
        backward: Callable[[Tensor], None],
        scale: Callable[[Tensor], Tensor],
        replay: Callable[[], AbstractContextManager[None]] | None,
        loss_fn: str,
        epsilon_scale: str = "absolute",
        clean_logits: Tensor | None = None,
        generator: torch.Generator | None = None,
        owner: str = "",
    ) -> None:
        self.space = space
        self.epsilon_scale = epsilon_scale
        self.generator = generator
        self._run_loss = run_loss
        self._backward = backward
        self._scale = scale
        self._replay = replay
        self._loss_fn = loss_fn
        self._owner = owner
        self._clean_logits = clean_logits
        self._reference_norms: Tensor | None = None
        self.dtype = (
            torch.promote_types(calls[0].output.dtype, torch.float32) if calls else torch.float32
        )
        self._clean_gradient: Tensor | None = self._gradient(
            [c.grad if c.grad is not None else torch.zeros_like(c.output) for c in calls]
        )
        for call in calls:  # now in clean_gradient: do not keep a second copy alive
            call.slot.grad = None
        self._like = torch.empty(0, dtype=self._clean_gradient.dtype,
                                 device=self._clean_gradient.device)
        self.shape = self._clean_gradient.shape
        self.adversarial_loss: Tensor | None = None
        self.perturbation: Tensor | None = None
        self.classes: int | None = None
        self.recomputed_clean_logits = False
        #: Extra statistics a method wants logged (device tensors), by short name.
        self.logs: dict[str, Tensor] = {}

    # -- shapes and budgets -----------------------------------------------------------

    @property
    def clean_gradient(self) -> Tensor:
        """This micro-batch's loss gradient with respect to the perturbation."""
        if self._clean_gradient is None:
            raise RuntimeError(
                "The clean gradient of this step was already taken by `take_clean_gradient()`."
            )
        return self._clean_gradient

    def take_clean_gradient(self) -> Tensor:
        """The clean gradient, handed over: the step forgets it, so the caller may overwrite
        it in place (a one-step method turns it into its perturbation without a copy)."""
        gradient = self.clean_gradient
        self._clean_gradient = None
        return gradient

    def _space(self) -> Space:
        if self.space is None:
            raise RuntimeError("This method perturbs no embedding: it has no perturbation space.")
        return self.space

    def _gradient(self, grads: list[Tensor]) -> Tensor:
        if self.space is None:
            return torch.zeros(0)
        return self.space.gradient(grads, self.dtype)

    def zeros(self) -> Tensor:
        return self._like.new_zeros(self.shape)

    def mask(self, r: Tensor) -> Tensor:
        """Zero the entries of ``r`` that belong to padding."""
        return self._space().mask(r)

    @property
    def reference(self) -> Tensor:
        """What is perturbed, in perturbation shape: each example's clean embedding output,
        or the touched rows of the weight; padding zeroed. Built anew on each use, so it
        is not kept alive through the adversarial passes."""
        return self._space().reference(self.dtype)

    def reference_norms(self) -> Tensor:
        """The L2 norm of each row of :attr:`reference`, shape ``(examples, 1)``."""
        if self._reference_norms is None:
            self._reference_norms = row_norms(self.reference)
        return self._reference_norms

    def entries(self) -> Tensor:
        """Number of perturbable (non-padding) entries per row, shape ``(examples, 1)``."""
        return self._space().entries(self.shape).to(self.dtype)

    def l2_budget(self, value: float) -> float | Tensor:
        """An L2 radius or step size: ``value`` itself, or with ``epsilon_scale="relative"``,
        ``value`` times each row's norm of what is perturbed (shape ``(examples, 1)``)."""
        if self.epsilon_scale == "absolute":
            return value
        return value * self.reference_norms()

    def entry_budget(self, value: float) -> float | Tensor:
        """A per-entry size (sign steps, L-infinity balls, noise scales): ``value`` itself,
        or with ``epsilon_scale="relative"``, ``value`` times the root-mean-square entry of
        what is perturbed, per row."""
        if self.epsilon_scale == "absolute":
            return value
        return value * self.reference_norms() / self.entries().clamp_min(1).sqrt()

    def relative_sizes(self, r: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, largest)`` size of ``r`` relative to what it perturbs; see
        :func:`lightning_adv.functional.relative_sizes`."""
        return relative_sizes(r.to(self.dtype), self.reference, self._space().hidden)

    def size_logs(self, r: Tensor) -> dict[str, Tensor]:
        """What the callback logs about a perturbation: its mean L2 norm per row and its
        mean and largest size relative to what it perturbs."""
        mean, largest = self.relative_sizes(r)
        return {"perturbation_norm": row_norms(r.float()).mean(),
                "rel_size_mean": mean.float(), "rel_size_max": largest.float()}

    def normal(self) -> Tensor:
        """Standard normal noise in perturbation shape from the callback's generator."""
        like = self._like
        return torch.randn(self.shape, generator=self.generator, dtype=like.dtype,
                           device=like.device)

    def uniform(self) -> Tensor:
        """Noise uniform in ``[-1, 1)`` in perturbation shape from the callback's generator."""
        like = self._like
        noise = torch.rand(self.shape, generator=self.generator, dtype=like.dtype,
                           device=like.device)
        return 2 * noise - 1

    # -- passes -----------------------------------------------------------------------

    def clean_logits(self) -> Tensor:
        """The clean pass's logits, detached.

        Received from the clean pass when the loss method ran there and returned logits;
        otherwise recomputed once by a forward without gradient (one extra forward).
        """
        if self._clean_logits is None:
            replay = self._replay() if self._replay is not None else nullcontext()
            with torch.no_grad(), replay:
                output = self._run_loss()
            self._clean_logits = Forward(output, [], self._loss_fn, self._owner).logits.detach()
            self.recomputed_clean_logits = True
        return self._clean_logits

    @contextmanager
    def forward_at(self, r: Tensor | None, keep_calls: bool = True,
                   release: bool = False) -> Iterator[Forward]:
        """Run the loss method with ``r`` applied (``None``: nothing applied). ``r`` stays
        applied until the block ends, so a backward inside the block sees it. Without
        ``keep_calls`` the forward records no embedding call (``forward.calls`` is empty):
        enough for a backward into the parameters, and it frees the embedding outputs.
        ``release`` is explained in :meth:`backward_at`."""
        replay = self._replay() if self._replay is not None else nullcontext()
        applied = (self._space().applied(r, keep_calls, release) if r is not None
                   else _no_calls())
        with applied as calls:
            with replay:
                output = self._run_loss()
            _, logits = parse_loss_output(output)
            if logits is not None:
                self.classes = logits.shape[-1]
            yield Forward(output=output, calls=calls, loss_fn=self._loss_fn, owner=self._owner)

    def perturbation_gradient(self, value: Tensor, forward: Forward) -> Tensor:
        """Gradient of ``value`` with respect to the perturbation of ``forward``, in the
        shape of a perturbation. Parameters' ``.grad`` are not touched."""
        return self._gradient(self.grad(value, [call.output for call in forward.calls]))

    def grad(self, value: Tensor, inputs: Sequence[Tensor]) -> list[Tensor]:
        """``torch.autograd.grad`` of ``value`` (AMP-scaled like the clean loss) with respect
        to ``inputs``; unused inputs get zeros and no parameter's ``.grad`` changes."""
        grads = torch.autograd.grad(
            self._scale(value), inputs, allow_unused=True, materialize_grads=True
        )
        return list(grads)

    def gradient_at(self, r: Tensor) -> Tensor:
        """Gradient of the loss at ``r`` with respect to the perturbation only."""
        with self.forward_at(r) as forward:
            return self.perturbation_gradient(forward.loss, forward)

    def backward(self, value: Tensor, perturbation: Tensor | None,
                 forward: Forward | None = None) -> Tensor | None:
        """Backpropagate ``adv_weight * value`` into every parameter's ``.grad``, scaled like
        the clean loss (gradient accumulation, AMP loss scale) and all-reduced under DDP.

        With ``forward``, the same backward also yields the gradient with respect to that
        pass's perturbation (FreeLB's free ascent direction), which is returned.
        """
        if forward is not None:
            for call in forward.calls:
                call.output.register_hook(call.slot)  # type: ignore[no-untyped-call]
        self._backward(value)
        detached = value.detach()
        self.adversarial_loss = (
            detached if self.adversarial_loss is None else self.adversarial_loss + detached
        )
        if perturbation is not None:
            self.perturbation = perturbation.detach()
        if forward is None:
            return None
        return self._gradient(
            [c.grad if c.grad is not None else torch.zeros_like(c.output) for c in forward.calls]
        )

    def backward_at(self, r: Tensor | None, release: bool = False) -> Tensor:
        """One forward at ``r`` and a full backward of the adversarial loss; returns it.

        With ``release`` the caller is done with ``r``: the weight target may then keep its
        backup of the perturbed rows in ``r``'s memory instead of a copy, so the values of
        ``r`` are undefined afterwards. Its sizes are logged from before the pass.
        """
        if release and r is not None:
            self.logs = {**self.size_logs(r), **self.logs}
        with self.forward_at(r, keep_calls=False, release=release) as forward:
            loss = forward.loss
            self.backward(loss, None if release else r)
            return loss.detach()


@contextmanager
def _no_calls() -> Iterator[list[EmbeddingCall]]:
    yield []
