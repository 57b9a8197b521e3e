"""SMART: smoothness-inducing adversarial regularisation (Jiang et al., 2020)."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from lightning_adv._checks import check_choice, check_count, check_non_negative
from lightning_adv.callback import AdversarialCallback
from lightning_adv.functional import (
    l2_direction,
    linf_direction,
    project_l2,
    project_linf,
    symmetric_kl,
)
from lightning_adv.step import AttackStep

__all__ = ["SMART"]


class SMART(AdversarialCallback):
    """SMART's smoothness-inducing regulariser on the embedding output.

    Jiang et al., "SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural
    Language Models through Principled Regularized Optimization", ACL 2020, Algorithm 1:
    ``delta_0 ~ N(0, noise_std^2)`` on non-padding entries; for ``steps`` times,
    ``g = grad_delta symmetric_kl(f(x + delta), f(x))`` and
    ``delta = P_epsilon(delta + alpha * g / ||g||_inf)`` per example; then
    ``adv_weight * symmetric_kl(f(x + delta), f(x))`` (the paper's ``lambda_s``) is
    backpropagated, with the clean logits ``f(x)`` detached. The Bregman proximal point
    term of the paper is not included.

    Defaults: the paper's Section 4 settings (``sigma = 1e-5``, ``eta = 1e-3``,
    ``epsilon = 1e-5``, one step, ``lambda_s = 1``).

    Cost: ``steps`` forward passes with a partial backward (to the embedding output
    only), plus one full forward and backward. The clean logits come free from the
    clean pass when the loss method returns them (see ``docs/methods/smart.md``);
    otherwise they cost one forward without gradient.

    Args:
        epsilon: radius of the ball around the embeddings (per entry for ``"linf"``).
        alpha: ascent step size.
        steps: ascent steps, at least 1.
        noise_std: standard deviation of the initial noise.
        norm: ``"linf"`` (the paper) or ``"l2"`` geometry of steps and ball.
        **kwargs: shared arguments of :class:`~lightning_adv.AdversarialCallback`;
            only ``target="output"`` applies; ``adv_weight`` is ``lambda_s``.

    Example::

        trainer = Trainer(callbacks=[SMART(loss_fn="compute_loss")])
    """

    identity = ("epsilon", "alpha", "steps", "noise_std", "norm")
    targets = ("output",)

    def __init__(self, epsilon: float = 1e-5, alpha: float = 1e-3, steps: int = 1,
                 noise_std: float = 1e-5, norm: Literal["linf", "l2"] = "linf",
                 target: Literal["output"] = "output", **kwargs: Any) -> None:
        super().__init__(target=target, **kwargs)
        self.epsilon = check_non_negative("SMART", "epsilon", epsilon, "1e-5")
        self.alpha = check_non_negative("SMART", "alpha", alpha, "1e-3")
        self.steps = check_count("SMART", "steps", steps, 1)
        self.noise_std = check_non_negative("SMART", "noise_std", noise_std, "1e-5")
        self.norm = check_choice("SMART", "norm", norm, ("linf", "l2"))

    def attack(self, step: AttackStep) -> None:
        clean = step.clean_logits()
        delta = step.mask(step.normal()) * step.entry_budget(self.noise_std)
        for _ in range(self.steps):
            with step.forward_at(delta) as forward:
                divergence = symmetric_kl(forward.logits, clean)
                gradient = step.perturbation_gradient(divergence, forward)
            delta = step.mask(self._ascend(step, delta, gradient))
        with step.forward_at(delta) as forward:
            step.backward(symmetric_kl(forward.logits, clean), delta)

    def _ascend(self, step: AttackStep, delta: Tensor, gradient: Tensor) -> Tensor:
        if self.norm == "linf":
            delta = delta + step.entry_budget(self.alpha) * linf_direction(gradient)
            return project_linf(delta, step.entry_budget(self.epsilon))
        delta = delta + step.l2_budget(self.alpha) * l2_direction(gradient)
        return project_l2(delta, step.l2_budget(self.epsilon))
