"""Adversarial weight perturbation (Wu et al., 2020), as used for NLP fine-tuning."""

from __future__ import annotations

import re
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_adv._checks import check_count, check_non_negative
from lightning_adv.callback import AdversarialCallback
from lightning_adv.step import AttackStep

__all__ = ["AWP"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


class AWP(AdversarialCallback):
    """Adversarial weight perturbation of the model's weight matrices.

    Wu, Xia and Wang, "Adversarial Weight Perturbation Helps Robust Generalization",
    NeurIPS 2020, eq. (7)-(8), in the form used for NLP fine-tuning: for every selected
    weight ``w`` with gradient ``g``, ``steps`` times
    ``w <- clip(w + adv_lr * g / ||g|| * ||w||, w0 - adv_epsilon * |w0|,
    w0 + adv_epsilon * |w0|)`` (``w0`` the weight before the attack, bounds entry by
    entry); then one forward and full backward at the perturbed weights adds
    ``adv_weight`` times the adversarial gradient, and every weight is copied back.

    The first direction is this micro-batch's own gradient, captured by a tensor hook on
    each selected weight during the clean backward, so it is neither the sum over an
    accumulation window nor (under DDP) averaged over ranks. Later steps use the gradient
    at the perturbed weights, taken with ``torch.autograd.grad``.

    Defaults: ``adv_epsilon=0.01`` is the paper's weight-perturbation size (gamma of
    0.01 in its adversarial-training runs); ``adv_lr=1.0`` and one step are the values
    common in NLP fine-tuning write-ups, which let the clip bound the step.

    Cost: one forward and full backward, plus a copy of the selected weights (restored
    after); each extra step adds a forward and a backward without touching ``.grad``.

    Args:
        adv_lr: step size relative to each weight's norm.
        adv_epsilon: bound of the perturbation relative to each entry.
        steps: perturbation steps, at least 1.
        params: regular expression selecting trainable parameters by name, outside
            embedding and normalisation layers (never perturbed); by default every weight
            with two or more dimensions there.
        **kwargs: shared arguments of :class:`~lightning_adv.AdversarialCallback`
            (``loss_fn``, ``adv_weight``, schedule, ...); ``target`` and ``embedding`` do
            not apply and are refused unless left at their defaults.

    Example::

        trainer = Trainer(callbacks=[AWP(adv_lr=1.0, adv_epsilon=0.01, start_step=500)])
    """

    identity = ("adv_lr", "adv_epsilon", "steps", "params")
    needs_embedding = False
    size_argument = "adv_epsilon"

    def __init__(self, adv_lr: float = 1.0, adv_epsilon: float = 0.01, steps: int = 1,
                 params: str | None = None, **kwargs: Any) -> None:
        # Defaults pass (a LightningCLI config lists every argument); other values would
        # silently do nothing. `epsilon_scale` may be either: AWP is relative anyway.
        for name, default in (("target", "weight"), ("embedding", None)):
            if kwargs.get(name, default) != default:
                raise TypeError(
                    f"AWP: `{name}` does not apply: AWP perturbs the weight matrices chosen "
                    f"by `params`, not the word embedding. Remove `{name}={kwargs[name]!r}`."
                )
        super().__init__(**kwargs)
        self.adv_lr = check_non_negative("AWP", "adv_lr", adv_lr, "1.0")
        self.adv_epsilon = check_non_negative("AWP", "adv_epsilon", adv_epsilon, "0.01")
        self.steps = check_count("AWP", "steps", steps, 1)
        if params is not None:
            try:
                re.compile(params)
            except (re.error, TypeError) as error:
                raise ValueError(
                    f"AWP: `params` must be a regular expression over parameter names such "
                    f"as 'attention|intermediate', got {params!r} ({error})."
                ) from None
        self.params = params
        self._weights: list[tuple[str, nn.Parameter]] = []
        self._grads: dict[int, Tensor] = {}
        self._handles: list[Any] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._weights = self._select(pl_module)
        self._handles = [
            weight.register_hook(self._keeper(index))  # type: ignore[no-untyped-call]
            for index, (_, weight) in enumerate(self._weights)
        ]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._grads = [], {}
        super().teardown(trainer, pl_module, stage)

    def attack(self, step: AttackStep) -> None:
        weights = [weight for _, weight in self._weights]
        grads = [self._grads.pop(i, torch.zeros_like(w)) for i, w in enumerate(weights)]
        originals = [w.detach().clone() for w in weights]
        try:
            for t in range(self.steps):
                if t > 0:
                    with step.forward_at(None) as forward:
                        grads = step.grad(forward.loss, weights)
                sizes = torch.stack(self._perturb(weights, grads, originals, first=t == 0))
            step.logs["rel_size_mean"] = sizes.mean()
            step.logs["rel_size_max"] = sizes.max()
            step.backward_at(None)
        finally:
            with torch.no_grad():
                for weight, original in zip(weights, originals, strict=True):
                    weight.copy_(original)
        self._grads.clear()

    def _perturb(self, weights: list[nn.Parameter], grads: list[Tensor],
                 originals: list[Tensor], first: bool) -> list[Tensor]:
        """One step on every weight; returns each weight's offset from its original,
        relative to the original's norm (for the logs).

        Works on the offset, in place where it can: the weights can be most of the model,
        and every pass over them costs as much as a small matmul.
        """
        sizes = []
        with torch.no_grad():
            for weight, grad, original in zip(weights, grads, originals, strict=True):
                wide = torch.promote_types(weight.dtype, torch.float32)
                weight_norm = torch.linalg.vector_norm(weight.detach(), dtype=wide)
                grad_norm = torch.linalg.vector_norm(grad, dtype=wide)
                # adv_lr * g / ||g|| * ||w||; a zero gradient gives a zero step.
                factor = (self.adv_lr * weight_norm / grad_norm.clamp_min(1e-30)).to(
                    weight.dtype)
                offset = grad.to(weight.dtype) * factor
                if not first:
                    offset += weight.detach() - original
                bound = original.abs().mul_(self.adv_epsilon)
                torch.minimum(offset, bound, out=offset)
                torch.maximum(offset, bound.neg_(), out=offset)
                torch.add(original, offset, out=weight)
                sizes.append(torch.linalg.vector_norm(offset, dtype=wide)
                             / torch.linalg.vector_norm(original, dtype=wide).clamp_min(1e-30))
        return sizes

    def _keeper(self, index: int) -> Any:
        def keep(grad: Tensor) -> None:
            if self.in_clean_pass:
                self._grads[index] = grad.detach()

        return keep

    def _select(self, pl_module: pl.LightningModule) -> list[tuple[str, nn.Parameter]]:
        embedding_weights = {
            id(m.weight) for m in pl_module.modules() if isinstance(m, nn.Embedding)
        }
        selected: list[tuple[str, nn.Parameter]] = []
        seen: set[int] = set()
        for module_name, module in pl_module.named_modules():
            if isinstance(module, (nn.Embedding, *_NORMS)):
                continue
            for name, param in module.named_parameters(recurse=False):
                full = f"{module_name}.{name}" if module_name else name
                if not param.requires_grad or id(param) in seen:
                    continue
                if self.params is not None:
                    chosen = re.search(self.params, full) is not None
                else:
                    chosen = param.dim() >= 2 and id(param) not in embedding_weights
                if chosen:
                    selected.append((full, param))
                    seen.add(id(param))
        if not selected:
            rule = f"`params={self.params!r}`" if self.params else "the default rule"
            raise RuntimeError(
                f"AWP: {rule} selects no trainable parameter of {type(pl_module).__name__} "
                "(embedding and normalisation layers are never perturbed). Pass `params=` "
                "with a regular expression matching weight names, e.g. 'encoder'."
            )
        return selected
