"""Hand-written reference formulas of the methods, in a plain PyTorch loop.

No code of the library is used here: each function states its method's math directly on
a Hugging Face model, so a test comparing the two can fail.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tests.helpers import PAD

Batch = dict[str, Tensor]


def _l2_unit(g: Tensor, dims: tuple[int, ...]) -> Tensor:
    norm = g.pow(2).sum(dim=dims, keepdim=True).sqrt()
    return torch.where(norm > 0, g / norm.clamp_min(1e-300), torch.zeros_like(g))


def _project(r: Tensor, radius: float, dims: tuple[int, ...]) -> Tensor:
    norm = r.pow(2).sum(dim=dims, keepdim=True).sqrt()
    return torch.where(norm > radius, r * radius / norm.clamp_min(1e-300), r)


def weight_target_grads(model: torch.nn.Module, batches: list[Batch], method: str,
                        epsilon: float, alpha: float = 0.0, steps: int = 1,
                        adv_weight: float = 1.0, accumulate: int = 1) -> dict[str, Tensor]:
    """Gradients after clean + adversarial passes, perturbing the weight in place."""
    weight = model.get_input_embeddings().weight
    for batch in batches:
        clean = model(**batch).loss / accumulate
        # This micro-batch's own weight gradient, not the accumulated `.grad`.
        (g,) = torch.autograd.grad(clean, weight, retain_graph=True)
        clean.backward()
        r = _weight_perturbation(model, batch, g, method, epsilon, alpha, steps)
        backup = weight.detach().clone()
        with torch.no_grad():
            weight.add_(r)
        (adv_weight * model(**batch).loss / accumulate).backward()
        with torch.no_grad():
            weight.copy_(backup)
    return {name: p.grad for name, p in model.named_parameters()}


def _weight_perturbation(model: torch.nn.Module, batch: Batch, g: Tensor, method: str,
                         epsilon: float, alpha: float, steps: int) -> Tensor:
    weight = model.get_input_embeddings().weight
    dims = (0, 1)
    if method == "fgm":
        return epsilon * _l2_unit(g, dims)
    if method == "fgsm":
        return epsilon * g.sign()
    r = torch.zeros_like(weight)
    for t in range(steps):
        if t > 0:
            backup = weight.detach().clone()
            with torch.no_grad():
                weight.add_(r)
            (g,) = torch.autograd.grad(model(**batch).loss, weight)
            with torch.no_grad():
                weight.copy_(backup)
        r = _project(r + alpha * _l2_unit(g, dims), epsilon, dims)
    return r


def output_target_grads(model: torch.nn.Module, batches: list[Batch], method: str,
                        epsilon: float, alpha: float = 0.0, steps: int = 1,
                        adv_weight: float = 1.0, accumulate: int = 1) -> dict[str, Tensor]:
    """Gradients after clean + adversarial passes, perturbing ``inputs_embeds`` per example."""
    embedding = model.get_input_embeddings()
    for batch in batches:
        keep = (batch["input_ids"] != PAD).unsqueeze(-1).to(torch.float64)

        def loss_at(r: Tensor, batch: Batch = batch) -> Tensor:
            inputs = embedding(batch["input_ids"]) + r
            return model(inputs_embeds=inputs, attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss

        zero = torch.zeros(*batch["input_ids"].shape, embedding.embedding_dim,
                           dtype=torch.float64, requires_grad=True)
        clean = loss_at(zero) / accumulate
        (g,) = torch.autograd.grad(clean, zero, retain_graph=True)
        clean.backward()
        r = _output_perturbation(loss_at, g * keep, keep, method, epsilon, alpha, steps)
        (adv_weight * loss_at(r) / accumulate).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def _output_perturbation(loss_at: Callable[[Tensor], Tensor], g: Tensor, keep: Tensor,
                         method: str, epsilon: float, alpha: float, steps: int) -> Tensor:
    dims = (1, 2)  # one norm per example over (tokens, hidden)
    if method == "fgm":
        return epsilon * _l2_unit(g, dims)
    if method == "fgsm":
        return epsilon * g.sign() * keep
    r = torch.zeros_like(g)
    for t in range(steps):
        if t > 0:
            leaf = r.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(loss_at(leaf), leaf)
            g = g * keep
        r = _project(r + alpha * _l2_unit(g, dims), epsilon, dims)
    return r
