"""Manual optimization: the attack runs through a side-effect-free loss method.

Under manual optimization ``training_step`` steps the optimizer itself, so the callback
re-runs ``loss_fn="compute_loss"`` inside ``manual_backward``; the adversarial loss is not
divided by ``accumulate_grad_batches`` there (Lightning forbids that option in manual mode).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor

from lightning_adv import FGM, FGSM, PGD
from tests import reference
from tests.helpers import GradRecorder, ManualClassifier, clone, loader, make_batches, tiny_bert
from tests.helpers import trainer as make_trainer

METHODS = {
    "fgm": (FGM, {"epsilon": 1.0}),
    "fgsm": (FGSM, {"epsilon": 0.05}),
    "pgd": (PGD, {"epsilon": 1.0, "alpha": 0.4, "steps": 3}),
}
EMBEDDING = "bert.embeddings.word_embeddings.weight"


def _reference(model: torch.nn.Module, batch: dict[str, Tensor], method: str, target: str,
               adv_weight: float) -> dict[str, Tensor]:
    fn = reference.weight_target_grads if target == "weight" else reference.output_target_grads
    return fn(clone(model), [batch], method, adv_weight=adv_weight, **METHODS[method][1])


class CountingManualClassifier(ManualClassifier):
    """Counts the calls of ``training_step`` and of the loss method."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.0) -> None:
        super().__init__(model, lr)
        self.steps_run = 0
        self.losses_run = 0

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self.steps_run += 1
        return super().training_step(batch, batch_idx)

    def compute_loss(self, batch: dict[str, Tensor], batch_idx: int) -> Any:
        self.losses_run += 1
        return super().compute_loss(batch, batch_idx)


class BatchSpy(pl.Callback):
    def __init__(self) -> None:
        self.batches_started = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self.batches_started += 1


@pytest.mark.parametrize("adv_weight", [1.0, 0.5])
@pytest.mark.parametrize("target", ["weight", "output"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_manual_optimization_gradients_match_reference(method, target, adv_weight):
    steps = 2
    model = tiny_bert()
    batches = make_batches(steps)
    cls, args = METHODS[method]
    callback = cls(target=target, loss_fn="compute_loss", adv_weight=adv_weight, **args)
    recorder = GradRecorder()
    module = CountingManualClassifier(clone(model))
    make_trainer([callback, recorder], max_steps=steps).fit(module, loader(batches))

    forwards = 1 + METHODS[method][1].get("steps", 1)
    assert module.steps_run == steps
    assert module.losses_run == steps * forwards
    assert len(recorder.grads) == steps
    # lr=0 keeps the model fixed, and the module zeroes the gradients every step: each
    # step's gradient is the reference formula on its own batch, not divided by anything.
    for got, batch in zip(recorder.grads, batches, strict=True):
        want = _reference(model, batch, method, target, adv_weight)
        for name, expected in want.items():
            actual = got["model." + name]
            assert actual is not None, name
            torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10, msg=name)
        clean = _reference(model, batch, method, target, adv_weight=0.0)
        assert not torch.allclose(want[EMBEDDING], (1 + adv_weight) * clean[EMBEDDING],
                                  atol=1e-6)


@pytest.mark.parametrize("cls", [FGM, FGSM, PGD])
def test_training_step_as_loss_fn_is_refused_at_setup(cls):
    module = CountingManualClassifier(tiny_bert(), lr=0.1)
    initial = {name: p.detach().clone() for name, p in module.named_parameters()}
    spy = BatchSpy()
    trainer = make_trainer([cls(), spy], max_steps=2)

    with pytest.raises(RuntimeError, match="compute_loss") as error:
        trainer.fit(module, loader(make_batches(2)))

    assert "loss_fn" in str(error.value)
    assert any(entry.name == "setup" for entry in error.traceback), "not raised in setup"
    assert module.steps_run == 0
    assert module.losses_run == 0
    assert spy.batches_started == 0
    assert trainer.global_step == 0
    for name, value in module.named_parameters():
        assert torch.equal(value, initial[name]), name


def test_compute_loss_under_manual_optimization_trains():
    # The same module with `loss_fn="compute_loss"` is accepted and steps the optimizer.
    module = CountingManualClassifier(tiny_bert(), lr=0.1)
    initial = module.get_parameter("model." + EMBEDDING).detach().clone()
    trainer = make_trainer([FGM(loss_fn="compute_loss")], max_steps=2)
    trainer.fit(module, loader(make_batches(2)))
    assert trainer.global_step == 2
    assert not torch.equal(module.get_parameter("model." + EMBEDDING), initial)


class DividingManualClassifier(ManualClassifier):
    """Manual optimization that divides its loss by 4 before the backward, as a module
    accumulating four micro-batches by hand does."""

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        loss = self.compute_loss(batch, batch_idx)["loss"]
        optimizer.zero_grad()
        self.manual_backward(loss / 4)
        optimizer.step()
        return loss.detach()


def test_ratio_ignores_what_a_manual_module_divides_its_loss_by():
    ratios = []
    for module_class in (ManualClassifier, DividingManualClassifier):
        fit = make_trainer([FGM(epsilon=0.0, loss_fn="compute_loss", adv_weight=0.25)],
                           max_steps=1, log_every_n_steps=1)
        fit.fit(module_class(clone(tiny_bert())), loader(make_batches(1)))
        ratios.append(float(fit.callback_metrics["fgm/adv_clean_ratio"]))
    # epsilon=0: the adversarial loss is the clean loss, whatever the module scales.
    assert ratios == pytest.approx([1.0, 1.0], rel=1e-9)
