"""FreeLB: free large-batch adversarial training (Zhu et al., 2020)."""

from __future__ import annotations

from typing import Any, Literal

from lightning_adv._checks import check_choice, check_count, check_non_negative
from lightning_adv.callback import AdversarialCallback
from lightning_adv.functional import l2_direction, linf_direction, project_l2, project_linf
from lightning_adv.step import AttackStep

__all__ = ["FreeLB"]


class FreeLB(AdversarialCallback):
    """FreeLB: ascent on the embedding output, averaging the gradients of every step.

    Zhu et al., "FreeLB: Enhanced Adversarial Training for Natural Language
    Understanding", ICLR 2020, Algorithm 1. ``delta_0`` is uniform noise inside the ball
    (padding zero; L2: scaled by ``init_magnitude / sqrt(tokens * hidden)`` per example);
    for ``t = 1..steps`` one forward and full backward of ``L(x + delta_{t-1}) / steps``
    adds to the parameters' gradients, and the same backward gives ``g_t`` for
    ``delta_t = P(delta_{t-1} + alpha * g_t / ||g_t||)``. The optimizer steps on
    ``clean_weight * clean gradient + mean over t of the adversarial gradients``.
    Unlike the paper, which drops the clean loss, the clean gradient is kept by default:
    small models lose accuracy without it; ``clean_weight=0`` gives the paper's update.

    Defaults: the SST-2 row of the authors' ``launch/run_glue.sh`` (adv-lr 0.1,
    adv-init-mag 1.0, adv-max-norm 0.6, adv-steps 3).

    Cost: ``steps`` forward and full backward passes, and no separate pass for the ascent
    direction (it comes free from each backward).

    Args:
        alpha: ascent step size (per example).
        steps: number of passes, at least 1.
        init_magnitude: size of the random start; 0 starts at zero.
        max_norm: radius of the ball to project onto, per example; 0 means unbounded.
        norm: ``"l2"`` or ``"linf"`` geometry of steps, start and ball.
        clean_weight: weight of the clean gradient in the update (0 to drop it).
        **kwargs: shared arguments of :class:`~lightning_adv.AdversarialCallback`;
            only ``target="output"`` applies.

    Example::

        trainer = Trainer(callbacks=[FreeLB(alpha=0.1, steps=3)])
    """

    identity = ("alpha", "steps", "init_magnitude", "max_norm", "norm")
    targets = ("output",)
    size_argument = "max_norm"

    def __init__(self, alpha: float = 0.1, steps: int = 3, init_magnitude: float = 1.0,
                 max_norm: float = 0.6, norm: Literal["l2", "linf"] = "l2",
                 clean_weight: float = 1.0, target: Literal["output"] = "output",
                 **kwargs: Any) -> None:
        super().__init__(target=target, **kwargs)
        self.alpha = check_non_negative("FreeLB", "alpha", alpha, "0.1")
        self.steps = check_count("FreeLB", "steps", steps, 1)
        self.init_magnitude = check_non_negative("FreeLB", "init_magnitude", init_magnitude,
                                                 "1.0")
        self.max_norm = check_non_negative("FreeLB", "max_norm", max_norm, "0.6")
        self.norm = check_choice("FreeLB", "norm", norm, ("l2", "linf"))
        self.clean_weight = check_non_negative("FreeLB", "clean_weight", clean_weight, "1.0")

    def attack(self, step: AttackStep) -> None:
        delta = self._random_start(step)
        for t in range(self.steps):
            last = t == self.steps - 1
            with step.forward_at(delta) as forward:
                gradient = step.backward(forward.loss / self.steps, delta,
                                         forward=None if last else forward)
            if gradient is not None:
                delta = step.mask(self._ascend(step, delta, gradient))

    def _random_start(self, step: AttackStep) -> Any:
        noise = step.mask(step.uniform())
        if self.norm == "l2":
            return noise * step.l2_budget(self.init_magnitude) / step.entries().clamp_min(1).sqrt()
        return noise * step.entry_budget(self.init_magnitude)

    def _ascend(self, step: AttackStep, delta: Any, gradient: Any) -> Any:
        if self.norm == "l2":
            delta = delta + step.l2_budget(self.alpha) * l2_direction(gradient)
            if self.max_norm > 0:
                delta = project_l2(delta, step.l2_budget(self.max_norm))
            return delta
        delta = delta + step.entry_budget(self.alpha) * linf_direction(gradient)
        if self.max_norm > 0:
            delta = project_linf(delta, step.entry_budget(self.max_norm))
        return delta
