"""No attacked step leaves memory behind: the count of live tensors stays flat."""

from __future__ import annotations

import gc
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_adv import AWP, FGM, FGSM, PGD, R3F, SMART, VAT, FreeLB, RobustAccuracy
from tests.helpers import Classifier, loader, make_batches, tiny_bert, trainer


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if torch.is_tensor(obj))


class CountTensors(pl.Callback):
    """The number of live tensors after each training batch and each validation batch."""

    def __init__(self) -> None:
        self.train: list[int] = []
        self.val: list[int] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.train.append(live_tensors())

    def on_validation_batch_end(self, *args: Any) -> None:
        self.val.append(live_tensors())


CALLBACKS = {
    "fgm-weight": lambda: FGM(epsilon=0.1),
    "fgm-output": lambda: FGM(epsilon=0.1, target="output"),
    "fgsm": lambda: FGSM(epsilon=0.01),
    "pgd": lambda: PGD(epsilon=0.1, alpha=0.05, steps=2),
    "freelb": lambda: FreeLB(steps=2),
    "smart": lambda: SMART(loss_fn="compute_loss"),
    "vat": lambda: VAT(loss_fn="compute_loss"),
    "r3f": lambda: R3F(loss_fn="compute_loss"),
    "awp": lambda: AWP(),
}


@pytest.mark.parametrize("name", CALLBACKS)
def test_attacked_steps_keep_no_tensors_alive(name):
    # Each step's embedding outputs, their gradients and graphs must be freed by the next
    # step; a reference cycle through a tensor hook once kept two tensors per step alive.
    counter = CountTensors()
    fit = trainer([CALLBACKS[name](), counter], max_steps=8)
    fit.fit(Classifier(tiny_bert(), lr=0.01), loader(make_batches(8)))
    assert len(counter.train) == 8
    assert counter.train[-1] == counter.train[2], counter.train


class Validated(Classifier):
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.model(**batch).loss)


def test_robust_accuracy_keeps_no_tensors_alive():
    counter = CountTensors()
    fit = trainer([RobustAccuracy(epsilon=0.1, steps=2), counter], max_steps=1,
                  num_sanity_val_steps=0)
    batches = make_batches(6)
    fit.fit(Validated(tiny_bert(), lr=0.01), loader(batches[:1]), loader(batches))
    assert len(counter.val) == 6
    assert counter.val[-1] == counter.val[2], counter.val


@pytest.mark.parametrize("cls", [FGM, FGSM])
def test_one_step_methods_hold_a_single_row_buffer_during_their_pass(cls):
    # The clean gradient becomes the perturbation in place, and once the rows are written
    # the backup moves into its memory: one buffer of the touched rows' size, not three.
    model = tiny_bert()
    batches = make_batches(1)
    positions, hidden = batches[0]["input_ids"].numel(), model.config.hidden_size
    shapes = {(1, positions * hidden), (positions, hidden)}
    buffers: list[int] = []

    def count(*args: Any) -> None:
        gc.collect()
        buffers.append(len({
            obj.untyped_storage().data_ptr() for obj in gc.get_objects()
            if torch.is_tensor(obj) and not isinstance(obj, torch.nn.Parameter)
            and tuple(obj.shape) in shapes
        }))

    model.classifier.register_forward_hook(count)
    trainer([cls(epsilon=0.01)], max_steps=1).fit(Classifier(model), loader(batches))
    assert buffers == [0, 1]  # the clean forward, then the adversarial one
