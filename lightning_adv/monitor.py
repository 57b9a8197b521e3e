"""A warning before adversarial training collapses the model to one class."""

from __future__ import annotations

import math

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

__all__ = [
    "OUTPUT_LARGEST_LIMIT",
    "OUTPUT_MEAN_LIMIT",
    "WEIGHT_LARGEST_LIMIT",
    "WEIGHT_MEAN_LIMIT",
    "CollapseMonitor",
]

#: Mean relative size above which to warn, per target, from measured collapses: the
#: weight target trained pretrained MiniLM at 0.1 and collapsed at 0.3, and FGSM drowned
#: the character model at 0.49; the output target trained MiniLM at 0.03 and collapsed it
#: at 0.1 and 0.23 while the largest size per token stayed below 1.
WEIGHT_MEAN_LIMIT = 0.25
OUTPUT_MEAN_LIMIT = 0.08
#: Relative size of the single largest token (output) or row (weight) above which to warn.
#: The weight target's one norm, shared by every touched row, lets a few rows of rare
#: tokens take many times the mean: FGM at relative 0.05 from step 300 trained the
#: character model well with a row at 1.12, while the weight runs that collapsed it had
#: rows at 3.0 to 9.0.
WEIGHT_LARGEST_LIMIT = 2.0
OUTPUT_LARGEST_LIMIT = 1.0


class CollapseMonitor:
    """Watches an attack's statistics and warns once per cause when a run heads for collapse.

    Statistics are folded into device tensors at every attacked step; they are read on the
    host only in :meth:`check`, which the callback calls when Lightning logs anyway (at the
    first attacked step, then every ``log_every_n_steps`` attacked steps), so the attack
    path itself never synchronises.

    Four signs, each from runs that collapsed to one class:

    - the largest perturbation of one token (output target) or one row (weight target) is
      larger than ``largest_limit`` times the vector it perturbs (default 1; the callbacks
      use 2 for the weight target);
    - the perturbation is on average larger than ``mean_limit`` times what it perturbs
      (a quarter for the weight target: FGSM's sign steps spread the budget evenly, so its
      largest stays small while every touched row moves by half its length; 0.08 for the
      output target, which collapsed a pretrained model at a mean of 0.1);
    - the clean training loss, after having fallen below ``0.85 * ln(classes)``, climbs back
      to within 5 % of chance level ``ln(classes)`` while the attack is on;
    - the clean training loss never falls below ``0.85 * ln(classes)`` in ``stuck_after``
      attacked steps (FreeLB with a ball of 0.1 ended the sentiment example's character
      model at the majority class while no other sign fired).

    Args:
        owner: the callback's class name, for messages.
        epsilon: the value of the callback's size argument, used to suggest a smaller one.
        argument: the name of that argument (``epsilon``; FreeLB's is ``max_norm``).
        relative: whether the callback already sizes relatively (``epsilon_scale``).
        largest_limit: relative size of one token or row above which to warn.
        mean_limit: mean relative size above which to warn.
        stuck_after: attacked steps after which a clean loss that never left chance level
            is warned about.
    """

    def __init__(self, owner: str, epsilon: float | None, argument: str = "epsilon",
                 relative: bool = False, largest_limit: float = 1.0,
                 mean_limit: float = WEIGHT_MEAN_LIMIT, stuck_after: int = 500) -> None:
        self.owner = owner
        self.epsilon = epsilon
        self.argument = argument
        self.relative = relative
        self.largest_limit = largest_limit
        self.mean_limit = mean_limit
        self._mean: Tensor | None = None
        self.classes: int | None = None
        self.warned: set[str] = set()
        self._largest: Tensor | None = None
        self._clean_loss: Tensor | None = None
        self._learned = False
        self.stuck_after = stuck_after
        self.steps = 0

    def update(self, largest: Tensor | None, clean_loss: Tensor | None,
               classes: int | None, mean: Tensor | None = None) -> None:
        """Fold in one attacked step; device operations only."""
        self.steps += 1
        if mean is not None:
            mean = mean.detach().float()
            self._mean = mean if self._mean is None else torch.maximum(self._mean, mean)
        if largest is not None:
            largest = largest.detach().float()
            self._largest = (
                largest if self._largest is None else torch.maximum(self._largest, largest)
            )
        if clean_loss is not None:
            clean_loss = clean_loss.detach().float()
            if self._clean_loss is None:
                self._clean_loss = clean_loss
            else:
                self._clean_loss = 0.9 * self._clean_loss + 0.1 * clean_loss
        if classes is not None and classes > 1:
            self.classes = classes

    def check(self) -> list[str]:
        """Read the folded statistics on the host, warn about new causes, and reset."""
        messages = []
        largest = self._largest.item() if self._largest is not None else 0.0
        self._largest = None
        if largest > self.largest_limit and "largest" not in self.warned:
            messages.append(self._largest_message(largest))
            self.warned.add("largest")
        mean = self._mean.item() if self._mean is not None else 0.0
        self._mean = None
        if mean > self.mean_limit and not self.warned & {"largest", "mean"}:
            messages.append(self._mean_message(mean))
            self.warned.add("mean")

        if self._clean_loss is not None and self.classes is not None:
            chance = math.log(self.classes)
            clean = self._clean_loss.item()
            if clean < 0.85 * chance:
                self._learned = True
            elif self._learned and clean > 0.95 * chance and "chance" not in self.warned:
                messages.append(self._chance_message(clean, chance))
                self.warned.add("chance")
            elif (not self._learned and self.steps >= self.stuck_after
                    and not self.warned & {"chance", "stuck"}):
                messages.append(self._stuck_message(clean, chance))
                self.warned.add("stuck")

        for message in messages:
            rank_zero_warn(message, category=UserWarning)
        return messages

    def _largest_message(self, largest: float) -> str:
        return self._size_message(
            f"the largest perturbation of a single token or embedding row is {largest:.2f} "
            "times the vector it perturbs", 0.5 / largest)

    def _mean_message(self, mean: float) -> str:
        return self._size_message(
            f"the perturbation is on average {mean:.2f} times the embeddings it perturbs",
            # aim for a mean of 0.05, or well under a lower limit (0.032 for the output)
            min(0.05, 0.4 * self.mean_limit) / mean)

    def _size_message(self, finding: str, factor: float) -> str:
        """A warning about the perturbation's size; ``factor`` times the size argument is
        the value suggested instead."""
        value = f" (try `{self.argument}={self.epsilon * factor:.3g}`)" if self.epsilon else ""
        return (f"{self.owner}: {finding}: training is likely to collapse to one class. "
                f"Lower `{self.argument}`{value}{self._relative_hint()}.")

    def _chance_message(self, clean: float, chance: float) -> str:
        return self._loss_message(
            f"the clean training loss has climbed back to {clean:.3f}, chance level for "
            f"{self.classes} classes is {chance:.3f}: the attack is likely drowning the input",
            "Lower")

    def _stuck_message(self, clean: float, chance: float) -> str:
        return self._loss_message(
            f"the clean training loss is {clean:.3f} after {self.steps} attacked steps and "
            f"has never fallen far below chance level for {self.classes} classes "
            f"({chance:.3f}): the attack may be keeping the model from learning",
            "Compare with a run without it, and lower")

    def _loss_message(self, finding: str, lower: str) -> str:
        """A warning about the clean loss; ``lower`` leads into the advice on the size."""
        return (f"{self.owner}: {finding}. {lower} `{self.argument}` (try a tenth of it)"
                f"{self._relative_hint()}.")

    def _relative_hint(self) -> str:
        if self.relative:
            return ""
        return (", or use `epsilon_scale='relative'`, which sizes the perturbation to the "
                "embeddings of this model")
