"""Fast Gradient Method (Miyato et al., 2017)."""

from __future__ import annotations

from typing import Any

from lightning_adv._checks import check_non_negative
from lightning_adv.callback import AdversarialCallback
from lightning_adv.functional import l2_direction
from lightning_adv.step import AttackStep

__all__ = ["FGM"]


class FGM(AdversarialCallback):
    """Fast Gradient Method: one L2-normalised gradient step on the embeddings.

    Miyato, Dai and Goodfellow, "Adversarial Training Methods for Semi-Supervised Text
    Classification", ICLR 2017, eq. (2): ``r = epsilon * g / ||g||_2``, with ``g`` the
    gradient of this micro-batch's loss with respect to the embedding. The optimizer
    steps on ``grad(L(x)) + adv_weight * grad(L(x + r))``.

    Cost: one extra forward and backward per attacked step.

    Args:
        epsilon: L2 norm of the perturbation: over all touched rows for
            ``target="weight"``, per example for ``target="output"``.
        **kwargs: shared arguments of :class:`~lightning_adv.AdversarialCallback`
            (``target``, ``embedding``, ``loss_fn``, ``adv_weight``, schedule, ...).

    Example::

        trainer = Trainer(callbacks=[FGM(epsilon=1.0)])
    """

    identity = ("epsilon",)

    def __init__(self, epsilon: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epsilon = check_non_negative("FGM", "epsilon", epsilon, "1.0")

    def attack(self, step: AttackStep) -> None:
        # The gradient becomes the perturbation in place: no second buffer of its size.
        r = l2_direction(step.take_clean_gradient(), inplace=True)
        step.backward_at(r.mul_(step.l2_budget(self.epsilon)), release=True)
