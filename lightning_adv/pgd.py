"""Projected Gradient Descent on the embeddings (Madry et al., 2018)."""

from __future__ import annotations

from typing import Any

from lightning_adv._checks import check_count, check_non_negative
from lightning_adv.callback import AdversarialCallback
from lightning_adv.functional import l2_direction, project_l2
from lightning_adv.step import AttackStep

__all__ = ["PGD"]


class PGD(AdversarialCallback):
    """Projected gradient ascent in an L2 ball around the embeddings.

    Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
    ICLR 2018, with L2-normalised steps as used for text by Zhu et al. (FreeLB, 2020):

    ``r_0 = 0``; for ``t = 1..steps``: ``r_t = P_epsilon(r_{t-1} + alpha * g_t / ||g_t||)``,
    where ``g_1`` is the clean gradient and ``g_t`` the gradient at ``r_{t-1}``; then one
    backward of ``adv_weight * L(x + r_steps)`` into the parameters' gradients. The inner
    steps take the gradient with respect to the perturbation only.

    Cost: ``steps - 1`` forward passes with a partial backward (to the embedding output,
    no weight gradients) plus one full forward and backward.

    Args:
        epsilon: radius of the L2 ball (whole touched rows for ``target="weight"``, each
            example for ``target="output"``).
        alpha: size of each ascent step.
        steps: number of ascent steps, at least 1.
        **kwargs: shared arguments of :class:`~lightning_adv.AdversarialCallback`.

    Example::

        trainer = Trainer(callbacks=[PGD(epsilon=1.0, alpha=0.3, steps=3)])
    """

    identity = ("epsilon", "alpha", "steps")

    def __init__(self, epsilon: float = 1.0, alpha: float = 0.3, steps: int = 3,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epsilon = check_non_negative("PGD", "epsilon", epsilon, "1.0")
        self.alpha = check_non_negative("PGD", "alpha", alpha, "0.3")
        self.steps = check_count("PGD", "steps", steps, 1)

    def attack(self, step: AttackStep) -> None:
        radius, alpha = step.l2_budget(self.epsilon), step.l2_budget(self.alpha)
        r = step.zeros()
        gradient = step.clean_gradient
        for t in range(self.steps):
            if t > 0:
                gradient = step.gradient_at(r)
            r = project_l2(r + alpha * l2_direction(gradient), radius)
        step.backward_at(r)
