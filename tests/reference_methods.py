"""Hand-written float64 references of FreeLB, SMART, VAT, R3F and AWP in plain PyTorch.

Nothing of the library is used here. Each function runs the micro-batches of one optimizer
step through a Hugging Face classifier as its paper writes the method, leaving in every
parameter's ``.grad`` what the optimizer should receive. Perturbations of the embedding
output go in through ``inputs_embeds = word_embeddings(input_ids) + delta`` and are taken
per example over (tokens, hidden), padding kept at zero. Random starts and noise come from
one ``torch.Generator`` seeded once per run, drawn in the shape ``(batch, tokens * hidden)``
in float64, micro-batch after micro-batch.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.helpers import PAD

__all__ = [
    "Budget",
    "awp_grads",
    "awp_weights",
    "clean_grads",
    "freelb_grads",
    "kl",
    "pgd_grads",
    "r3f_grads",
    "smart_grads",
    "symmetric_kl",
    "vat_grads",
]

Batch = dict[str, Tensor]
Grads = dict[str, Tensor | None]


# -- the model under a perturbation ------------------------------------------------------


def _word_embeddings(model: nn.Module, batch: Batch) -> Tensor:
    return model.get_input_embeddings()(batch["input_ids"])


def _outputs(model: nn.Module, batch: Batch, delta: Tensor | None = None) -> Any:
    inputs = _word_embeddings(model, batch)
    if delta is not None:
        inputs = inputs + delta
    return model(inputs_embeds=inputs, attention_mask=batch["attention_mask"],
                 labels=batch.get("labels"))


def _keep(batch: Batch) -> Tensor:
    """1.0 on real tokens, 0.0 on padding; shape ``(batch, tokens, 1)``."""
    return (batch["input_ids"] != PAD).unsqueeze(-1).to(torch.float64)


def _draw(generator: torch.Generator, kind: str, batch: Batch, hidden: int) -> Tensor:
    rows, tokens = batch["input_ids"].shape
    shape = (rows, tokens * hidden)
    if kind == "normal":
        noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    else:
        noise = 2 * torch.rand(shape, generator=generator, dtype=torch.float64) - 1
    return noise.reshape(rows, tokens, hidden)


# -- per-example geometry over (tokens, hidden) --------------------------------------------


def _norm(x: Tensor) -> Tensor:
    return x.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()


def _max_abs(x: Tensor) -> Tensor:
    return x.abs().amax(dim=(1, 2), keepdim=True)


def _unit(g: Tensor, size: Tensor) -> Tensor:
    return torch.where(size > 0, g / size.clamp_min(1e-300), torch.zeros_like(g))


def _clip_l2(r: Tensor, radius: float | Tensor) -> Tensor:
    norm = _norm(r)
    return torch.where(norm > radius, r * radius / norm.clamp_min(1e-300), r)


def _clip_entries(r: Tensor, radius: float | Tensor) -> Tensor:
    radius = torch.as_tensor(radius, dtype=r.dtype)
    return torch.minimum(torch.maximum(r, -radius), radius)


class Budget:
    """Sizes read as absolute numbers or, if ``relative``, as fractions of each example's
    clean word-embedding output (padding excluded)."""

    def __init__(self, model: nn.Module, batch: Batch, relative: bool) -> None:
        keep = _keep(batch)
        clean = _word_embeddings(model, batch).detach() * keep
        self.hidden = clean.shape[-1]
        self.entries = keep.sum(dim=(1, 2), keepdim=True) * self.hidden
        self.size = _norm(clean)
        self.relative = relative

    def l2(self, value: float) -> float | Tensor:
        """An L2 radius or step of one example."""
        return value * self.size if self.relative else value

    def entry(self, value: float) -> float | Tensor:
        """A size per entry; relative to the root-mean-square entry."""
        return value * self.size / self.entries.sqrt() if self.relative else value


# -- divergences ----------------------------------------------------------------------------


def kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``KL(softmax(p) || softmax(q))``, mean over the batch."""
    log_p = F.log_softmax(logits_p, dim=-1)
    log_q = F.log_softmax(logits_q, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()


def symmetric_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    return kl(logits_p, logits_q) + kl(logits_q, logits_p)


def _grads(model: nn.Module) -> Grads:
    return {name: p.grad for name, p in model.named_parameters()}


# -- the methods ------------------------------------------------------------------------------


def pgd_grads(model: nn.Module, batches: list[Batch], *, epsilon: float, alpha: float,
              steps: int, adv_weight: float = 1.0, accumulate: int = 1) -> Grads:
    """Madry et al. (2018) with L2-normalised steps from ``r = 0`` on the embedding output,
    the first direction the clean gradient; ``steps=1, alpha=epsilon`` is FGM."""
    for batch in batches:
        keep = _keep(batch)
        zero = torch.zeros(*batch["input_ids"].shape, model.config.hidden_size,
                           dtype=torch.float64, requires_grad=True)
        loss = _outputs(model, batch, zero).loss / accumulate
        loss.backward()
        g = zero.grad * keep
        r = torch.zeros_like(g)
        for t in range(steps):
            if t > 0:
                leaf = r.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(_outputs(model, batch, leaf).loss, leaf)
                g = g * keep
            r = _clip_l2(r + alpha * _unit(g, _norm(g)), epsilon)
        (adv_weight * _outputs(model, batch, r).loss / accumulate).backward()
    return _grads(model)


def freelb_grads(model: nn.Module, batches: list[Batch], *, seed: int, alpha: float,
                 steps: int, init_magnitude: float, max_norm: float, norm: str,
                 clean_weight: float = 1.0, adv_weight: float = 1.0, accumulate: int = 1,
                 relative: bool = False) -> Grads:
    """Zhu et al. (2020), Algorithm 1, plus ``clean_weight`` times the clean gradient."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for batch in batches:
        keep = _keep(batch)
        budget = Budget(model, batch, relative)
        (clean_weight * model(**batch).loss / accumulate).backward()

        start = _draw(generator, "uniform", batch, budget.hidden) * keep
        if norm == "l2":
            delta = start * budget.l2(init_magnitude) / budget.entries.sqrt()
        else:
            delta = start * budget.entry(init_magnitude)
        for t in range(steps):
            leaf = delta.detach().requires_grad_(True)
            loss = _outputs(model, batch, leaf).loss / steps
            (adv_weight * loss / accumulate).backward()
            if t == steps - 1:
                break
            g = leaf.grad * keep
            if norm == "l2":
                delta = leaf.detach() + budget.l2(alpha) * _unit(g, _norm(g))
                if max_norm > 0:
                    delta = _clip_l2(delta, budget.l2(max_norm))
            else:
                delta = leaf.detach() + budget.entry(alpha) * _unit(g, _max_abs(g))
                if max_norm > 0:
                    delta = _clip_entries(delta, budget.entry(max_norm))
            delta = delta * keep
    return _grads(model)


def smart_grads(model: nn.Module, batches: list[Batch], *, seed: int, epsilon: float,
                alpha: float, steps: int, noise_std: float, norm: str,
                adv_weight: float = 1.0, accumulate: int = 1, relative: bool = False) -> Grads:
    """Jiang et al. (2020), Algorithm 1 without the Bregman proximal point term."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for batch in batches:
        keep = _keep(batch)
        budget = Budget(model, batch, relative)
        out = model(**batch)
        (out.loss / accumulate).backward()
        clean = out.logits.detach()

        delta = _draw(generator, "normal", batch, budget.hidden) * keep
        delta = delta * budget.entry(noise_std)
        for _ in range(steps):
            leaf = delta.detach().requires_grad_(True)
            divergence = symmetric_kl(_outputs(model, batch, leaf).logits, clean)
            (g,) = torch.autograd.grad(divergence, leaf)
            g = g * keep
            if norm == "linf":
                delta = delta + budget.entry(alpha) * _unit(g, _max_abs(g))
                delta = _clip_entries(delta, budget.entry(epsilon))
            else:
                delta = delta + budget.l2(alpha) * _unit(g, _norm(g))
                delta = _clip_l2(delta, budget.l2(epsilon))
            delta = delta * keep
        regulariser = symmetric_kl(_outputs(model, batch, delta).logits, clean)
        (adv_weight * regulariser / accumulate).backward()
    return _grads(model)


def vat_grads(model: nn.Module, batches: list[Batch], *, seed: int, epsilon: float,
              xi: float, power_iterations: int, adv_weight: float = 1.0,
              accumulate: int = 1, relative: bool = False,
              unlabeled: list[Batch] | None = None) -> Grads:
    """Miyato et al. (2017/2018): power iteration on ``KL(f(x) || f(x + r))``.

    With ``unlabeled``, the loss is the clean loss of ``batches`` and the virtual
    adversarial term is taken on the matching unlabelled batch.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for index, batch in enumerate(batches):
        out = model(**batch)
        (out.loss / accumulate).backward()
        if unlabeled is None:
            part, clean = batch, out.logits.detach()
        else:
            part = unlabeled[index]
            with torch.no_grad():
                clean = _outputs(model, part).logits
        keep = _keep(part)
        budget = Budget(model, part, relative)

        d = _draw(generator, "normal", part, budget.hidden) * keep
        for _ in range(power_iterations):
            r = (budget.l2(xi) * _unit(d, _norm(d))).requires_grad_(True)
            (d,) = torch.autograd.grad(kl(clean, _outputs(model, part, r).logits), r)
            d = d * keep
        r_vadv = budget.l2(epsilon) * _unit(d, _norm(d))
        divergence = kl(clean, _outputs(model, part, r_vadv).logits)
        (adv_weight * divergence / accumulate).backward()
    return _grads(model)


def r3f_grads(model: nn.Module, batches: list[Batch], *, seed: int, epsilon: float,
              noise: str, adv_weight: float = 1.0, accumulate: int = 1,
              relative: bool = False) -> Grads:
    """Aghajanyan et al. (2020), eq. (1)-(2), clean logits detached."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for batch in batches:
        keep = _keep(batch)
        budget = Budget(model, batch, relative)
        out = model(**batch)
        (out.loss / accumulate).backward()
        clean = out.logits.detach()

        z = _draw(generator, noise, batch, budget.hidden) * keep * budget.entry(epsilon)
        divergence = symmetric_kl(_outputs(model, batch, z).logits, clean)
        (adv_weight * divergence / accumulate).backward()
    return _grads(model)


def awp_weights(model: nn.Module, pattern: str | None = None) -> list[str]:
    """Names of the weights AWP perturbs: by default every matrix outside the embeddings
    (BERT's norms hold vectors only); else the parameters whose name (as seen from a
    LightningModule holding the model as ``model``) matches ``pattern``, norms excluded."""
    names = []
    for name, param in model.named_parameters():
        if "LayerNorm" in name or "embeddings" in name:
            continue
        if pattern is None:
            chosen = param.dim() == 2
        else:
            chosen = re.search(pattern, "model." + name) is not None
        if chosen:
            names.append(name)
    return names


def awp_grads(model: nn.Module, batches: list[Batch], *, adv_lr: float, adv_epsilon: float,
              steps: int, names: list[str], adv_weight: float = 1.0,
              accumulate: int = 1) -> Grads:
    """Wu et al. (2020), eq. (7)-(8): each selected ``w`` moves by
    ``adv_lr * g / ||g|| * ||w||``, clipped entry by entry to ``w0 -+ adv_epsilon * |w0|``;
    the direction of the first step is this micro-batch's own gradient."""
    params = dict(model.named_parameters())
    weights = [params[name] for name in names]
    for batch in batches:
        loss = model(**batch).loss / accumulate
        grads = torch.autograd.grad(loss, weights, retain_graph=True)
        loss.backward()

        originals = [w.detach().clone() for w in weights]
        for t in range(steps):
            if t > 0:
                grads = torch.autograd.grad(model(**batch).loss, weights)
            with torch.no_grad():
                for w, g, w0 in zip(weights, grads, originals, strict=True):
                    size = g.norm()
                    if size > 0:
                        w.add_(adv_lr * w.norm() * g / size)
                    bound = adv_epsilon * w0.abs()
                    w.copy_(torch.minimum(torch.maximum(w, w0 - bound), w0 + bound))
        (adv_weight * model(**batch).loss / accumulate).backward()
        with torch.no_grad():
            for w, w0 in zip(weights, originals, strict=True):
                w.copy_(w0)
    return _grads(model)


def clean_grads(model: nn.Module, batches: list[Batch], scale: float = 1.0) -> Grads:
    """``scale`` times the plain loss gradient summed over ``batches``."""
    for batch in batches:
        (scale * model(**batch).loss).backward()
    return _grads(model)

