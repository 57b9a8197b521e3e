"""Pure tensor math used by the attack methods.

Every perturbation is handled as a 2-D tensor of shape ``(examples, features)``: one row
per example for the output target, a single row for the weight target. Norms, steps and
projections act row by row. Nothing here reads a tensor's value on the host, so none of
these functions makes a device-to-host synchronisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "group_rows",
    "kl_divergence",
    "l2_direction",
    "linf_direction",
    "project_l2",
    "project_linf",
    "relative_sizes",
    "row_norms",
    "sign_direction",
    "symmetric_kl",
]


def row_norms(x: Tensor) -> Tensor:
    """L2 norm of each row of ``x`` (shape ``(B, D)``), as a ``(B, 1)`` tensor."""
    norms: Tensor = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return norms


def l2_direction(grad: Tensor, inplace: bool = False) -> Tensor:
    """``grad / ||grad||`` row by row.

    A row whose norm is zero, infinite or NaN gives a zero row, so a rank or an example
    with an unusable gradient is left unperturbed instead of skipping the pass. With
    ``inplace``, ``grad`` is overwritten with the result, bit for bit the same values.
    """
    norm = row_norms(grad)
    usable = torch.isfinite(norm) & (norm > 0)
    safe_norm = torch.where(usable, norm, torch.ones_like(norm))
    if inplace:
        return grad.masked_fill_(~usable, 0.0).div_(safe_norm)
    return torch.where(usable, grad / safe_norm, torch.zeros_like(grad))


def linf_direction(grad: Tensor) -> Tensor:
    """``grad / ||grad||_inf`` row by row; a zero or non-finite row gives a zero row."""
    norm = grad.abs().amax(dim=1, keepdim=True)
    usable = torch.isfinite(norm) & (norm > 0)
    safe_norm = torch.where(usable, norm, torch.ones_like(norm))
    return torch.where(usable, grad / safe_norm, torch.zeros_like(grad))


def sign_direction(grad: Tensor, inplace: bool = False) -> Tensor:
    """``sign(grad)`` row by row; a row holding any non-finite entry gives a zero row.
    With ``inplace``, ``grad`` is overwritten with the result."""
    usable = torch.isfinite(grad).all(dim=1, keepdim=True)
    if inplace:
        return grad.masked_fill_(~usable, 0.0).sign_()
    return torch.where(usable, grad.sign(), torch.zeros_like(grad))


def project_l2(r: Tensor, radius: float | Tensor) -> Tensor:
    """Project each row of ``r`` onto the L2 ball of ``radius`` (a float or ``(B, 1)``)."""
    norm = row_norms(r)
    tiny = torch.finfo(norm.dtype).tiny
    factor = torch.clamp(radius / norm.clamp_min(tiny), max=1.0)
    return r * factor


def project_linf(r: Tensor, radius: float | Tensor) -> Tensor:
    """Clamp every entry of ``r`` to ``[-radius, radius]`` (a float or ``(B, 1)``)."""
    if isinstance(radius, Tensor):
        return torch.maximum(torch.minimum(r, radius), -radius)
    return r.clamp(-radius, radius)


def relative_sizes(r: Tensor, reference: Tensor, unit: int) -> tuple[Tensor, Tensor]:
    """How large a perturbation is next to what it perturbs.

    Args:
        r: perturbation, shape ``(B, D)``.
        reference: the clean values ``r`` is added to, same shape.
        unit: entries per vector (the hidden size): ``D`` splits into tokens or rows.

    Returns:
        ``(mean, largest)``: the mean over rows of ``||r_b|| / ||reference_b||``, and the
        largest ``||r_u|| / ||reference_u||`` over single tokens or weight rows ``u``
        (vectors whose reference is zero, i.e. padding, are left out).
    """
    tiny = torch.finfo(reference.dtype).tiny
    per_row = row_norms(r) / row_norms(reference).clamp_min(tiny)
    r_units = torch.linalg.vector_norm(r.reshape(r.shape[0], -1, unit), dim=2)
    ref_units = torch.linalg.vector_norm(reference.reshape(r.shape[0], -1, unit), dim=2)
    per_unit = torch.where(ref_units > 0, r_units / ref_units.clamp_min(tiny), 0.0)
    return per_row.mean(), per_unit.max()


def _log_probs(logits: Tensor) -> Tensor:
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.log_softmax(logits.to(dtype), dim=-1)


def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``KL(p || q)`` between the softmax distributions, averaged over the batch.

    Computed in float32 or wider. ``logits_*`` have shape ``(B, ..., C)``; every position
    before the class axis counts as one distribution, and the sum is divided by ``B``.
    """
    log_p, log_q = _log_probs(logits_p), _log_probs(logits_q)
    p, q = log_p.exp(), log_q.exp()
    # p log(p / q) - p + q >= 0 term by term and sums to KL(p || q) (the p and q sum to 1).
    terms = p * (log_p - log_q) - p + q
    return terms.clamp_min(0).sum() / logits_p.shape[0]


def symmetric_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``KL(p || q) + KL(q || p)`` averaged over the batch, computed in float32 or wider.

    Shapes as in :func:`kl_divergence`. Written as ``sum (p - q)(log p - log q)``, a sum of
    non-negative terms, so it never goes below zero through rounding.
    """
    log_p, log_q = _log_probs(logits_p), _log_probs(logits_q)
    per_position = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=-1)
    return per_position.sum() / logits_p.shape[0]


def group_rows(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Group equal token ids without leaving the device.

    Args:
        ids: 1-D integer tensor of ``N`` token ids, duplicates allowed.

    Returns:
        ``(inverse, row_ids)``: ``inverse[i]`` is the group of position ``i`` (``0 <= g <
        N``) and ``row_ids[g]`` is the id of group ``g``, or ``-1`` for the unused groups
        at the end. ``torch.unique`` would give the same with a host sync for its size.
    """
    sorted_ids, order = ids.sort()
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group_sorted = starts.cumsum(0) - 1
    inverse = torch.empty_like(group_sorted).scatter_(0, order, group_sorted)
    row_ids = torch.full_like(ids, -1).scatter_(0, group_sorted, sorted_ids)
    return inverse, row_ids
