"""Fast Gradient Sign Method (Goodfellow et al., 2015)."""

from __future__ import annotations

from typing import Any

from lightning_adv._checks import check_non_negative
from lightning_adv.callback import AdversarialCallback
from lightning_adv.functional import sign_direction
from lightning_adv.step import AttackStep

__all__ = ["FGSM"]


class FGSM(AdversarialCallback):
    """Fast Gradient Sign Method: ``r = epsilon * sign(g)`` on the embeddings.

    Goodfellow, Shlens and Szegedy, "Explaining and Harnessing Adversarial Examples",
    ICLR 2015, eq. (3). Every touched entry moves by ``epsilon``, so ``epsilon`` is a
    per-entry size, not a norm: the same number means far more than in :class:`FGM`.

    The default ``epsilon=1e-3`` is chosen to match ``FGM(epsilon=1.0)`` in size: one unit
    of L2 norm spread over about 1,000 touched rows of a 768-wide embedding gives a
    root-mean-square entry of ``1 / sqrt(768_000) ~ 1.1e-3``, about 2 % of a typical BERT
    embedding entry (~0.05). The snippet this library replaces used ``epsilon=1``, twenty
    times a typical entry, which drowned the input and made training collapse.

    Cost: one extra forward and backward per attacked step.

    Args:
        epsilon: size of every perturbed entry.
        **kwargs: shared arguments of :class:`~lightning_adv.AdversarialCallback`.

    Example::

        trainer = Trainer(callbacks=[FGSM(epsilon=1e-3)])
    """

    identity = ("epsilon",)

    def __init__(self, epsilon: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epsilon = check_non_negative("FGSM", "epsilon", epsilon, "1e-3")

    def attack(self, step: AttackStep) -> None:
        # In place, as in FGM; padding entries have a zero gradient, so their sign is zero.
        r = sign_direction(step.take_clean_gradient(), inplace=True)
        step.backward_at(r.mul_(step.entry_budget(self.epsilon)), release=True)
