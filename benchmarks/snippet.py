"""The plain PyTorch competitor: the user's original FGM and PGD, rebuilt from their description.

This is what the library replaces, kept as it works so that its cost can be measured:
parameters are picked by a substring of their name, the whole embedding matrix is cloned
before every attack, the direction comes from ``param.grad`` (everything accumulated so
far), and restoring swaps the tensor behind ``param.data``. One defect is fixed so that it
is a fair competitor: PGD steps along the gradient (the original divided the weights by
the gradient norm). Do not use this for training; see ``lightning_adv`` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["SnippetFGM", "SnippetPGD", "plain_step"]

Batch = dict[str, Tensor]


def _matching(model: nn.Module, fragment: str) -> Iterator[tuple[str, nn.Parameter]]:
    for name, param in model.named_parameters():
        if param.requires_grad and fragment in name:
            yield name, param


class SnippetFGM:
    """Whole-matrix FGM: ``w += epsilon * grad / ||grad||`` on every matching parameter.

    Args:
        model: the network.
        epsilon: norm of the step, over the whole matrix.
        fragment: substring selecting the parameters to perturb.
    """

    def __init__(self, model: nn.Module, epsilon: float = 1.0,
                 fragment: str = "word_embeddings") -> None:
        self.model = model
        self.epsilon = epsilon
        self.fragment = fragment
        self.saved: dict[str, Tensor] = {}

    def attack(self) -> None:
        for name, param in _matching(self.model, self.fragment):
            self.saved[name] = param.data.clone()
            norm = torch.norm(param.grad)  # type: ignore[arg-type]
            # A truth test on a tensor: a host sync, and inf passes.
            if norm and not torch.isnan(norm):
                param.data.add_(self.epsilon * param.grad / norm)  # type: ignore[operator]

    def restore(self) -> None:
        for name, param in _matching(self.model, self.fragment):
            param.data = self.saved[name]
        self.saved = {}


class SnippetPGD:
    """Whole-matrix PGD with L2 steps of ``alpha`` projected on a ball of ``epsilon``.

    Besides the embedding copy it keeps a copy of every parameter's gradient, so that the
    inner steps can zero the gradients and the last one can put them back.

    Args:
        model: the network.
        epsilon: radius of the ball around the original matrix.
        alpha: size of each step.
        fragment: substring selecting the parameters to perturb.
    """

    def __init__(self, model: nn.Module, epsilon: float = 1.0, alpha: float = 0.3,
                 fragment: str = "word_embeddings") -> None:
        self.model = model
        self.epsilon = epsilon
        self.alpha = alpha
        self.fragment = fragment
        self.saved: dict[str, Tensor] = {}
        self.saved_grads: dict[str, Tensor] = {}

    def attack(self, first: bool) -> None:
        for name, param in _matching(self.model, self.fragment):
            if first:
                self.saved[name] = param.data.clone()
            norm = torch.norm(param.grad)  # type: ignore[arg-type]
            if norm != 0 and not torch.isnan(norm):
                param.data.add_(self.alpha * param.grad / norm)  # type: ignore[operator]
                param.data = self._project(name, param.data)

    def _project(self, name: str, data: Tensor) -> Tensor:
        offset = data - self.saved[name]
        if torch.norm(offset) > self.epsilon:
            offset = self.epsilon * offset / torch.norm(offset)
        return self.saved[name] + offset

    def restore(self) -> None:
        for name, param in _matching(self.model, self.fragment):
            param.data = self.saved[name]
        self.saved = {}

    def save_grads(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None:
                self.saved_grads[name] = param.grad.clone()

    def restore_grads(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None:
                param.grad = self.saved_grads[name]


def plain_step(kind: str, model: nn.Module, optimizer: torch.optim.Optimizer,
               batch: Batch, pgd_steps: int = 3) -> Callable[[], None]:
    """One training step of a plain loop, as a function to time.

    Args:
        kind: ``"none"`` (forward, backward, optimizer step), ``"fb"`` (forward and
            backward only, no optimizer step), ``"extra"`` (one more unperturbed forward and
            backward before the step), ``"fgm"`` or ``"pgd"`` (the snippet's loops).
        model: the network, in training mode.
        optimizer: its optimizer.
        batch: the batch, with labels.
        pgd_steps: the snippet's ``K``.
    """
    fgm, pgd = SnippetFGM(model), SnippetPGD(model)

    def loss() -> Tensor:
        value: Tensor = model(**batch).loss
        return value

    def none() -> None:
        optimizer.zero_grad()
        loss().backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    def forward_backward() -> None:
        optimizer.zero_grad()
        loss().backward()  # type: ignore[no-untyped-call]

    def extra() -> None:
        optimizer.zero_grad()
        loss().backward()  # type: ignore[no-untyped-call]
        loss().backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    def fgm_step() -> None:
        optimizer.zero_grad()
        loss().backward()  # type: ignore[no-untyped-call]
        fgm.attack()
        loss().backward()  # type: ignore[no-untyped-call]
        fgm.restore()
        optimizer.step()

    def pgd_step() -> None:
        optimizer.zero_grad()
        loss().backward()  # type: ignore[no-untyped-call]
        pgd.save_grads()
        for t in range(pgd_steps):
            pgd.attack(first=t == 0)
            if t < pgd_steps - 1:
                model.zero_grad()
            else:
                pgd.restore_grads()
            loss().backward()  # type: ignore[no-untyped-call]
        pgd.restore()
        optimizer.step()

    steps = {"none": none, "fb": forward_backward, "extra": extra, "fgm": fgm_step,
             "pgd": pgd_step}
    if kind not in steps:
        raise ValueError(f"Unknown plain step {kind!r}; expected one of {sorted(steps)}.")
    return steps[kind]
