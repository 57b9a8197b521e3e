"""R3F: robust representations through regularised fine-tuning (Aghajanyan et al., 2020)."""

from __future__ import annotations

from typing import Any, Literal

from lightning_adv._checks import check_choice, check_non_negative
from lightning_adv.callback import AdversarialCallback
from lightning_adv.functional import symmetric_kl
from lightning_adv.step import AttackStep

__all__ = ["R3F"]


class R3F(AdversarialCallback):
    """R3F: random noise on the embedding output and a symmetric KL penalty.

    Aghajanyan et al., "Better Fine-Tuning by Reducing Representational Collapse",
    ICLR 2021 (arXiv 2020), eq. (1)-(2): ``z ~ N(0, epsilon^2)`` or ``U(-epsilon,
    epsilon)`` on non-padding entries, and ``adv_weight * symmetric_kl(f(x + z), f(x))``
    (the paper's ``lambda``) is backpropagated. No ascent step. The clean logits are
    detached: the paper also lets the penalty's gradient flow through ``f(x)``, which
    would need the clean pass's graph after its backward.

    Defaults: the paper's Section 4 (``epsilon = 1e-5``, normal noise, ``lambda = 1``).

    Cost: one extra forward and backward; the clean logits come free from the clean pass
    when the loss method returns them, otherwise one more forward without gradient.

    Args:
        epsilon: scale of the noise (standard deviation, or half-width for uniform).
        noise: ``"normal"`` or ``"uniform"``.
        **kwargs: shared arguments of :class:`~lightning_adv.AdversarialCallback`;
            only ``target="output"`` applies; ``adv_weight`` is ``lambda``.

    Example::

        trainer = Trainer(callbacks=[R3F(loss_fn="compute_loss")])
    """

    identity = ("epsilon", "noise")
    targets = ("output",)

    def __init__(self, epsilon: float = 1e-5, noise: Literal["normal", "uniform"] = "normal",
                 target: Literal["output"] = "output", **kwargs: Any) -> None:
        super().__init__(target=target, **kwargs)
        self.epsilon = check_non_negative("R3F", "epsilon", epsilon, "1e-5")
        self.noise = check_choice("R3F", "noise", noise, ("normal", "uniform"))

    def attack(self, step: AttackStep) -> None:
        clean = step.clean_logits()
        draw = step.normal() if self.noise == "normal" else step.uniform()
        z = step.mask(draw) * step.entry_budget(self.epsilon)
        with step.forward_at(z) as forward:
            step.backward(symmetric_kl(forward.logits, clean), z)
