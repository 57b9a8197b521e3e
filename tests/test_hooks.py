"""Contract: the adversarial pass fires no hook a second time, leaves no trace in the logs or
metrics of ``training_step``, and the callback logs its own values on the scheduled steps.

Every run uses ``lr=0`` on a float64 tiny BERT, so each batch's clean loss can be computed
directly and compared with what was logged.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_adv import FGM, FGSM, PGD
from tests import reference
from tests.helpers import PAD, Classifier, loader, make_batches, tiny_bert, trainer

METHODS = {
    "fgm": (FGM, {"epsilon": 1.0}),
    "fgsm": (FGSM, {"epsilon": 0.05}),
    "pgd": (PGD, {"epsilon": 1.0, "alpha": 0.4, "steps": 3}),
}
ADVERSARIAL_FORWARDS = {"fgm": 1, "fgsm": 1, "pgd": 3}
CASES = [(method, target) for method in sorted(METHODS) for target in ("weight", "output")]
STEPS = 3

# Hooks of the LightningModule counted per optimizer step (``training_step`` is counted
# apart: re-running it is how the adversarial loss is computed).
MODULE_HOOKS = (
    "on_fit_start", "on_fit_end", "on_train_start", "on_train_end",
    "on_train_epoch_start", "on_train_epoch_end", "on_train_batch_start", "on_train_batch_end",
    "on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer",
    "on_before_backward", "backward", "on_after_backward", "on_before_optimizer_step",
    "configure_gradient_clipping", "optimizer_step", "on_before_zero_grad",
    "optimizer_zero_grad",
)
CALLBACK_HOOKS = tuple(
    name for name in dir(pl.Callback) if name.startswith("on_") or name in ("setup", "teardown")
)


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def batch_rows(self) -> list[dict[str, float]]:
        """The rows logged at the end of a training batch, in order."""
        return [metrics for _, metrics in self.rows if "train_loss" in metrics]


def _counting(name: str, owner: type) -> Any:
    def hook(self: Any, *args: Any, **kwargs: Any) -> Any:
        trainer_ = self.trainer if isinstance(self, pl.LightningModule) else args[0]
        self.hook_calls[name, trainer_.global_step] += 1
        return getattr(super(owner, self), name)(*args, **kwargs)

    hook.__name__ = name
    return hook


class HookSpy(pl.Callback):
    """Counts every callback hook, keyed by ``(hook name, global_step)``."""

    def __init__(self) -> None:
        self.hook_calls: Counter[tuple[str, int]] = Counter()


class RecordingClassifier(Classifier):
    """Counts its hooks and ``training_step`` calls per optimizer step; logs its loss three
    ways and updates two torchmetrics metrics in ``training_step``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model, lr=0.0)
        self.hook_calls: Counter[tuple[str, int]] = Counter()
        self.forwards: Counter[int] = Counter()
        self.mean_loss = MeanMetric()
        self.accuracy = MulticlassAccuracy(num_classes=3)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self.forwards[self.trainer.global_step] += 1
        output = self.model(**batch)
        self.mean_loss.update(output.loss)
        self.accuracy(output.logits, batch["labels"])
        self.log("train_loss", output.loss, on_step=True, on_epoch=False)
        self.log("epoch_loss", output.loss, on_step=False, on_epoch=True)
        self.log_dict({"twice_loss": 2 * output.loss}, on_step=True, on_epoch=False)
        return output.loss


for _name in CALLBACK_HOOKS:
    setattr(HookSpy, _name, _counting(_name, HookSpy))
for _name in MODULE_HOOKS:
    setattr(RecordingClassifier, _name, _counting(_name, RecordingClassifier))


@dataclass
class Run:
    module: RecordingClassifier
    spy: HookSpy
    logger: MemoryLogger
    trainer: pl.Trainer


@functools.cache
def _run(method: str | None, target: str = "weight", accumulate: int = 1, steps: int = STEPS,
         **schedule: Any) -> Run:
    """One fit, cached: several tests read the same run. ``method=None``: no attack."""
    callbacks: list[pl.Callback] = []
    if method is not None:
        cls, args = METHODS[method]
        callbacks.append(cls(target=target, **args, **schedule))
    spy, logger = HookSpy(), MemoryLogger()
    module = RecordingClassifier(tiny_bert())
    fit = trainer(
        [*callbacks, spy], max_steps=steps, accumulate_grad_batches=accumulate,
        logger=logger, log_every_n_steps=1,
    )
    fit.fit(module, loader(make_batches(steps * accumulate)))
    return Run(module, spy, logger, fit)


def _clean_losses(count: int) -> list[float]:
    model = tiny_bert()
    with torch.no_grad():
        return [model(**batch).loss.item() for batch in make_batches(count)]


def _expected_attack(batch: dict[str, Tensor], method: str, target: str) -> tuple[float, float]:
    """``(adversarial loss, mean perturbation norm)`` by the reference formulas."""
    model = tiny_bert()
    args = METHODS[method][1]
    epsilon, alpha, steps = args["epsilon"], args.get("alpha", 0.0), args.get("steps", 1)
    if target == "weight":
        weight = model.get_input_embeddings().weight
        (g,) = torch.autograd.grad(model(**batch).loss, weight)
        r = reference._weight_perturbation(model, batch, g, method, epsilon, alpha, steps)
        with torch.no_grad():
            weight.add_(r)
            return model(**batch).loss.item(), r.norm().item()

    embedding = model.get_input_embeddings()
    keep = (batch["input_ids"] != PAD).unsqueeze(-1).to(torch.float64)

    def loss_at(r: Tensor) -> Tensor:
        inputs = embedding(batch["input_ids"]) + r
        return model(inputs_embeds=inputs, attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss

    zero = torch.zeros(*batch["input_ids"].shape, embedding.embedding_dim,
                       dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(loss_at(zero), zero)
    r = reference._output_perturbation(loss_at, g * keep, keep, method, epsilon, alpha, steps)
    with torch.no_grad():
        return loss_at(r).item(), r.flatten(1).norm(dim=1).mean().item()


def _attacked_steps(steps: int, start_step: int, every_n_steps: int) -> set[int]:
    return {s for s in range(start_step, steps) if (s - start_step) % every_n_steps == 0}


# -- hooks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "accumulate"),
    [*((method, target, 1) for method, target in CASES), ("fgm", "weight", 2),
     ("pgd", "output", 2)],
)
def test_no_hook_fires_again_for_the_adversarial_pass(method, target, accumulate):
    attacked, clean = _run(method, target, accumulate), _run(None, accumulate=accumulate)

    assert clean.module.hook_calls[("on_after_backward", 0)] == accumulate
    assert attacked.module.hook_calls == clean.module.hook_calls
    assert attacked.spy.hook_calls == clean.spy.hook_calls
    # The adversarial forwards did run: training_step once more per pass and micro-batch.
    per_step = accumulate * (1 + ADVERSARIAL_FORWARDS[method])
    assert attacked.module.forwards == {step: per_step for step in range(STEPS)}
    assert clean.module.forwards == {step: accumulate for step in range(STEPS)}


# -- logging and metrics of training_step ----------------------------------------------


@pytest.mark.parametrize(("method", "target"), CASES)
def test_logs_of_the_adversarial_pass_are_suppressed(method, target):
    run = _run(method, target)
    clean = _clean_losses(STEPS)
    rows = run.logger.batch_rows()

    assert len(rows) == STEPS
    for row, loss in zip(rows, clean, strict=True):
        assert row["train_loss"] == pytest.approx(loss, rel=1e-12)
        assert row["twice_loss"] == pytest.approx(2 * loss, rel=1e-12)
    epoch_loss = run.trainer.logged_metrics["epoch_loss"]
    assert epoch_loss.item() == pytest.approx(sum(clean) / STEPS, rel=1e-12)


@pytest.mark.parametrize(("method", "target"), CASES)
def test_metric_states_match_a_run_without_attack(method, target):
    attacked, clean = _run(method, target).module, _run(None).module

    for name in ("mean_loss", "accuracy"):
        got, want = getattr(attacked, name), getattr(clean, name)
        assert got.update_count == want.update_count == STEPS, name
        for state in want.metric_state:
            assert torch.equal(getattr(got, state), getattr(want, state)), (name, state)
    losses = _clean_losses(STEPS)
    assert attacked.mean_loss.compute().item() == pytest.approx(sum(losses) / STEPS, rel=1e-6)
    torch.testing.assert_close(attacked.accuracy.compute(), clean.accuracy.compute())


# -- what the callback logs ------------------------------------------------------------


@pytest.mark.parametrize(("method", "target"), CASES)
def test_callback_logs_its_attack(method, target):
    run = _run(method, target)
    rows = run.logger.batch_rows()
    clean = _clean_losses(STEPS)
    batches = make_batches(STEPS)

    keys = {f"{method}/attacked", f"{method}/adv_loss", f"{method}/perturbation_norm"}
    assert keys <= set(run.trainer.logged_metrics)
    for row, loss, batch in zip(rows, clean, batches, strict=True):
        adv_loss, norm = _expected_attack(batch, method, target)
        assert row[f"{method}/attacked"] == 1.0
        # Logged in float32.
        assert row[f"{method}/adv_loss"] == pytest.approx(adv_loss, rel=1e-5)
        assert row[f"{method}/perturbation_norm"] == pytest.approx(norm, rel=1e-5)
        assert adv_loss > loss  # the attack raises the loss
    if method in ("fgm", "pgd"):
        # An L2 step of size epsilon; PGD's three steps of 0.4 end on the epsilon-sphere.
        assert rows[0][f"{method}/perturbation_norm"] == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize(
    ("start_step", "every_n_steps", "accumulate"),
    [(1, 2, 1), (1, 2, 2), (2, 1, 1)],
)
def test_schedule_attacks_exactly_the_scheduled_optimizer_steps(start_step, every_n_steps,
                                                                accumulate):
    steps = 6
    run = _run("fgm", "output", accumulate, steps,
               start_step=start_step, every_n_steps=every_n_steps, log_prefix="adv")
    attacked = _attacked_steps(steps, start_step, every_n_steps)
    assert attacked and len(attacked) < steps

    # Counted in optimizer steps: both micro-batches of an attacked step are attacked.
    expected = {s: accumulate * (2 if s in attacked else 1) for s in range(steps)}
    assert run.module.forwards == expected

    # Lightning logs once per optimizer step, the last micro-batch's values.
    rows = run.logger.batch_rows()
    flags = [row["adv/attacked"] for row in rows]
    assert flags == [float(s in attacked) for s in range(steps)]
    for row, flag in zip(rows, flags, strict=True):
        if flag:
            assert row["adv/adv_loss"] > row["train_loss"]
            assert row["adv/perturbation_norm"] == pytest.approx(1.0, rel=1e-5)
    assert not any(key.startswith("fgm/") for key in run.trainer.logged_metrics)


def test_skipped_step_reports_no_stale_attack_values():
    # Lightning keeps an on_step value until the epoch ends: a key logged on an attacked
    # step is reported again, unchanged, on the following skipped step unless the callback
    # logs something for it there. A skipped step had no adversarial loss and no
    # perturbation, so those keys must be absent or NaN, not the previous step's values.
    steps = 6
    run = _run("fgm", "output", 1, steps, start_step=1, every_n_steps=2, log_prefix="adv")
    attacked = _attacked_steps(steps, start_step=1, every_n_steps=2)
    rows = run.logger.batch_rows()
    for step, row in enumerate(rows):
        if step in attacked:
            continue
        assert row["adv/attacked"] == 0.0
        stale = {
            key: value for key, value in row.items()
            if key.startswith("adv/") and key != "adv/attacked" and not math.isnan(value)
        }
        assert not stale, f"step {step} (not attacked) reports {stale}"
