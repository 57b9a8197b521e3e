"""Mixed precision: the adversarial pass runs under the clean pass's autocast and scaler.

CPU only: ``precision="bf16-mixed"`` for autocast, and ``MixedPrecision("16-mixed", "cpu",
scaler=GradScaler("cpu"))`` for a real loss scaler whose gradients are scaled (even
infinite) in ``on_after_backward``. The tiny model is float32 here.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor

from lightning_adv import FGM, FGSM, PGD
from tests.helpers import Classifier, GradRecorder, clone, loader, make_batches, tiny_bert, trainer

METHODS = {
    "fgm": (FGM, {"epsilon": 1.0}),
    "fgsm": (FGSM, {"epsilon": 0.05}),
    "pgd": (PGD, {"epsilon": 1.0, "alpha": 0.4, "steps": 3}),
}
# Forward passes of the loss per attacked step: the clean one, then the method's.
FORWARDS = {"fgm": 2, "fgsm": 2, "pgd": 4}
EMBEDDING = "model.bert.embeddings.word_embeddings.weight"
TARGETS = ["weight", "output"]


def _callback(method: str, target: str) -> pl.Callback:
    cls, args = METHODS[method]
    return cls(target=target, **args)


def _fp16(scaler: torch.amp.GradScaler | None = None) -> MixedPrecision:
    if scaler is None:
        scaler = torch.amp.GradScaler("cpu")
    return MixedPrecision("16-mixed", "cpu", scaler=scaler)


def _params(module: pl.LightningModule) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _grads(module: pl.LightningModule) -> dict[str, Tensor]:
    return {
        name: p.grad.detach().clone()
        for name, p in module.named_parameters()
        if p.grad is not None
    }


def _flat(tensors: dict[str, Tensor]) -> Tensor:
    return torch.cat([tensors[name].double().reshape(-1) for name in sorted(tensors)])


def _relative_error(got: Tensor, want: Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


class AutocastProbe(Classifier):
    """Records, for every forward of the classifier head, the autocast state and the dtype
    of the head's output, keyed by optimizer step."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.0) -> None:
        super().__init__(model, lr)
        self.forwards: list[tuple[int, bool, torch.dtype]] = []
        model.classifier.register_forward_hook(self._record)

    def _record(self, module: torch.nn.Module, args: Any, output: Tensor) -> None:
        step = self.trainer.global_step
        self.forwards.append((step, torch.is_autocast_enabled("cpu"), output.dtype))


class StepWatch(pl.Callback):
    """Placed after the adversarial callback. Per step: were the gradients finite after the
    adversarial backward, was the embedding bitwise restored when the optimizer is about to
    step, and what were the parameters at the end of the batch."""

    def __init__(self) -> None:
        self.finite_after_backward: list[bool] = []
        self.restored: list[bool] = []
        self.params_after: list[dict[str, Tensor]] = []
        self._embedding: Tensor | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._embedding = pl_module.get_parameter(EMBEDDING).detach().clone()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        grads = _grads(pl_module).values()
        self.finite_after_backward.append(all(bool(g.isfinite().all()) for g in grads))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        current = pl_module.get_parameter(EMBEDDING)
        self.restored.append(torch.equal(current, self._embedding))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.params_after.append(_params(pl_module))


class GradsAfterBackward(pl.Callback):
    """``.grad`` of every parameter in ``on_after_backward``, with the loss scale then."""

    def __init__(self) -> None:
        self.grads: list[dict[str, Tensor]] = []
        self.scales: list[float] = []

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.grads.append(_grads(pl_module))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scales.append(scaler.get_scale() if scaler is not None else 1.0)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_bf16_adversarial_pass_runs_under_the_clean_autocast(method, target):
    steps = 3
    module = AutocastProbe(tiny_bert(dtype=torch.float32), lr=0.1)
    initial = _params(module)
    watch = StepWatch()
    trainer([_callback(method, target), watch], max_steps=steps, precision="bf16-mixed").fit(
        module, loader(make_batches(steps))
    )

    per_step = Counter(step for step, _, _ in module.forwards)
    assert per_step == {step: FORWARDS[method] for step in range(steps)}
    # Clean and adversarial forwards alike: autocast on, the Linear head computing in bf16.
    assert {(on, dtype) for _, on, dtype in module.forwards} == {(True, torch.bfloat16)}

    assert watch.restored == [True] * steps
    final = _params(module)
    assert all(value.isfinite().all() for value in final.values())
    assert not torch.equal(final[EMBEDDING], initial[EMBEDDING]), "training did not move"


def _scaled_run(model: torch.nn.Module, method: str, target: str,
                plugins: list[Any]) -> tuple[GradsAfterBackward, GradsAfterBackward, GradRecorder]:
    before, after, recorder = GradsAfterBackward(), GradsAfterBackward(), GradRecorder()
    callbacks = [before, _callback(method, target), after, recorder]
    trainer(callbacks, max_steps=1, plugins=plugins).fit(
        Classifier(clone(model)), loader(make_batches(1))
    )
    return before, after, recorder


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_fp16_scaler_scales_the_adversarial_loss_like_the_clean_loss(method, target):
    model = tiny_bert(dtype=torch.float32)
    before16, after16, optimizer16 = _scaled_run(model, method, target, [_fp16()])
    before32, after32, optimizer32 = _scaled_run(model, method, target, [])

    scale = after16.scales[0]
    assert scale == before16.scales[0] == 2.0**16

    # In the hook the gradients are scaled: clean part before the attack, clean plus
    # adversarial after it. Unscaled, each part matches the float32 run to fp16 accuracy.
    clean16 = _flat(before16.grads[0]) / scale
    adversarial16 = _flat(after16.grads[0]) / scale - clean16
    clean32 = _flat(before32.grads[0])
    adversarial32 = _flat(after32.grads[0]) - clean32
    assert _relative_error(clean16, clean32) < 0.005
    assert _relative_error(adversarial16, adversarial32) < 0.01
    # The adversarial part is not negligible next to the clean one.
    assert adversarial32.norm() > 0.2 * clean32.norm()

    # Lightning unscales before `on_before_optimizer_step`: what the optimizer gets matches
    # the float32 run, and is exactly the hook's gradient over the scale.
    at_optimizer16 = {k: v for k, v in optimizer16.grads[0].items() if v is not None}
    at_optimizer32 = {k: v for k, v in optimizer32.grads[0].items() if v is not None}
    assert _relative_error(_flat(at_optimizer16), _flat(at_optimizer32)) < 0.005
    torch.testing.assert_close(
        _flat(at_optimizer16), _flat(after16.grads[0]) / scale, rtol=1e-6, atol=0.0
    )


class InfiniteAdversarialLoss(Classifier):
    """Returns an infinite loss from the last forward of step 0 (the adversarial
    backward's), so only the adversarial gradient overflows."""

    def __init__(self, model: torch.nn.Module, lr: float, forwards: int) -> None:
        super().__init__(model, lr)
        self.forwards = forwards
        self._calls: Counter[int] = Counter()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        step = self.trainer.global_step
        self._calls[step] += 1
        loss = super().training_step(batch, batch_idx)
        if step == 0 and self._calls[step] == self.forwards:
            loss = loss * math.inf
        return loss


@pytest.mark.parametrize("overflow", ["loss_scale", "adversarial_loss"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_non_finite_step_is_skipped_and_training_continues(method, target, overflow):
    steps = 4
    model = tiny_bert(dtype=torch.float32)
    if overflow == "loss_scale":
        # 2**60 overflows every fp16 gradient; one backoff brings the scale to 2**10.
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60, backoff_factor=2.0**-50)
        module: Classifier = Classifier(model, lr=0.1)
    else:
        scaler = torch.amp.GradScaler("cpu")
        module = InfiniteAdversarialLoss(model, lr=0.1, forwards=FORWARDS[method])
    initial = _params(module)
    before, watch = GradsAfterBackward(), StepWatch()
    trainer([before, _callback(method, target), watch], max_steps=steps,
            plugins=[_fp16(scaler)]).fit(module, loader(make_batches(steps)))

    clean_finite = [all(bool(g.isfinite().all()) for g in d.values()) for d in before.grads]
    assert clean_finite[0] is (overflow == "adversarial_loss")
    assert watch.finite_after_backward == [False, True, True, True]
    assert watch.restored == [True] * steps

    # Step 0 was skipped: every parameter, the embedding included, is bitwise unchanged.
    for name, value in initial.items():
        assert torch.equal(watch.params_after[0][name], value), name
    assert scaler.get_scale() < (2.0**60 if overflow == "loss_scale" else 2.0**16)
    # The later steps trained, and nothing non-finite reached the weights.
    final = watch.params_after[-1]
    assert all(value.isfinite().all() for value in final.values())
    assert not torch.equal(final[EMBEDDING], initial[EMBEDDING])
    assert not torch.equal(watch.params_after[1][EMBEDDING], initial[EMBEDDING])
