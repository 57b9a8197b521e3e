"""Virtual adversarial training (Miyato et al., 2017)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from lightning_adv._checks import check_count, check_non_negative
from lightning_adv.callback import AdversarialCallback
from lightning_adv.functional import kl_divergence, l2_direction
from lightning_adv.step import AttackStep

__all__ = ["VAT"]


class VAT(AdversarialCallback):
    """Virtual adversarial training on the embedding output; needs no labels.

    Miyato, Dai and Goodfellow, "Adversarial Training Methods for Semi-Supervised Text
    Classification", ICLR 2017, eq. (3)-(5), with the power iteration of Miyato et al.,
    "Virtual Adversarial Training", TPAMI 2018: ``d ~ N(0, I)``; ``power_iterations``
    times ``d = grad_r KL(f(x) || f(x + r))`` at ``r = xi * d / ||d||``; then
    ``r_vadv = epsilon * d / ||d||`` per example and ``adv_weight * KL(f(x) ||
    f(x + r_vadv))`` is backpropagated with ``f(x)`` detached.

    With ``batch_key="unlabeled"`` the passes use ``batch["unlabeled"]`` of a combined
    batch (for example from a ``CombinedLoader``), so unlabelled text trains the model:
    the loss method must return logits for that part (a loss is not needed).

    Defaults: the authors' ``adversarial_text`` code (``perturb_norm_length=5.0``,
    ``small_constant_for_finite_diff=0.1``, ``num_power_iteration=1``). They perturb
    normalised embeddings; on raw embeddings consider ``epsilon_scale="relative"``.

    Cost: ``power_iterations`` forward passes with a partial backward, plus one full
    forward and backward; clean logits as for :class:`~lightning_adv.SMART`, and with
    ``batch_key`` one forward without gradient on the unlabelled part.

    Args:
        epsilon: L2 norm of the virtual adversarial perturbation, per example.
        xi: finite-difference radius of the power iteration.
        power_iterations: at least 1.
        batch_key: key of the part of a mapping batch to attack; ``None`` for the batch.
        **kwargs: shared arguments of :class:`~lightning_adv.AdversarialCallback`;
            only ``target="output"`` applies.

    Example::

        trainer = Trainer(callbacks=[VAT(batch_key="unlabeled", loss_fn="compute_loss")])
    """

    identity = ("epsilon", "xi", "power_iterations", "batch_key")
    targets = ("output",)

    def __init__(self, epsilon: float = 5.0, xi: float = 0.1, power_iterations: int = 1,
                 batch_key: str | None = None, target: Literal["output"] = "output",
                 **kwargs: Any) -> None:
        super().__init__(target=target, **kwargs)
        self.epsilon = check_non_negative("VAT", "epsilon", epsilon, "5.0")
        self.xi = check_non_negative("VAT", "xi", xi, "0.1")
        self.power_iterations = check_count("VAT", "power_iterations", power_iterations, 1)
        if batch_key is not None and (not isinstance(batch_key, str) or not batch_key):
            raise TypeError(f"VAT: `batch_key` must be None or a key such as 'unlabeled', "
                            f"got {batch_key!r}.")
        self.batch_key = batch_key

    def attack_batch(self, batch: Any) -> Any:
        if self.batch_key is None:
            return batch
        if not isinstance(batch, Mapping) or self.batch_key not in batch:
            keys = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise RuntimeError(
                f"VAT: `batch_key={self.batch_key!r}` but the training batch has no such "
                f"part (got {keys}). Train on a combined batch such as "
                f"{{'labeled': ..., {self.batch_key!r}: ...}}, or pass `batch_key=None`."
            )
        return batch[self.batch_key]

    def attack(self, step: AttackStep) -> None:
        clean = step.clean_logits()
        d = step.mask(step.normal())
        for _ in range(self.power_iterations):
            r = step.l2_budget(self.xi) * l2_direction(d)
            with step.forward_at(r) as forward:
                d = step.perturbation_gradient(kl_divergence(clean, forward.logits), forward)
        r_vadv = step.l2_budget(self.epsilon) * l2_direction(d)
        with step.forward_at(r_vadv) as forward:
            step.backward(kl_divergence(clean, forward.logits), r_vadv)
