"""Inner ascent steps differentiate with respect to the perturbation only.

A spy logs every forward of the model (``F``) and every backward that accumulates into a
parameter's ``.grad`` (``B``, from ``register_post_accumulate_grad_hook``), and copies
every ``.grad`` at each forward. ``torch.autograd.grad`` accumulates nothing, so an
attacked step must read as the clean pass, the inner steps as bare forwards, and only the
passes the method backpropagates as ``B``; ``.grad`` must not change (values or tensor)
between the clean backward and the first adversarial backward.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_adv import AWP, PGD, SMART, VAT, FreeLB
from tests.helpers import Classifier, loader, make_batches, tiny_bert, trainer


class LogitsClassifier(Classifier):
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.compute_loss(batch, batch_idx)["loss"]


class GradSpy:
    def __init__(self, module: Classifier) -> None:
        self.events: list[str] = []
        self.snapshots: list[dict[str, tuple[int, Tensor] | None]] = []
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        module.model.register_forward_pre_hook(self._forward)
        for _, param in self.params:
            param.register_post_accumulate_grad_hook(self._accumulated)

    def _forward(self, model: torch.nn.Module, args: Any) -> None:
        self.events.append("F")
        self.snapshots.append({
            name: None if p.grad is None else (id(p.grad), p.grad.detach().clone())
            for name, p in self.params
        })

    def _accumulated(self, param: torch.nn.Parameter) -> None:
        if self.events[-1] != "B":
            self.events.append("B")


CASES = {
    # name: (callback, expected log of one attacked step)
    "pgd-output": (lambda: PGD(steps=3, target="output"), "FBFFFB"),
    "pgd-weight": (lambda: PGD(steps=3, target="weight"), "FBFFFB"),
    # FreeLB's ascent direction comes free from each pass's full backward: one B per pass.
    "freelb": (lambda: FreeLB(steps=3, seed=0), "FBFBFBFB"),
    "smart": (lambda: SMART(steps=2, epsilon=0.1, alpha=0.05, noise_std=0.01, seed=0,
                            loss_fn="compute_loss"), "FBFFFB"),
    "vat": (lambda: VAT(power_iterations=2, seed=0, loss_fn="compute_loss",
                        warn_on_collapse=False), "FBFFFB"),
    "awp": (lambda: AWP(steps=2, adv_lr=0.05, adv_epsilon=0.1), "FBFFB"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_inner_steps_leave_parameter_grads_alone(name):
    make, expected = CASES[name]
    module = LogitsClassifier(tiny_bert())
    spy = GradSpy(module)
    trainer([make()], max_steps=1).fit(module, loader(make_batches(1)))

    assert "".join(spy.events) == expected
    after_clean = spy.snapshots[1]
    assert all(value is not None for value in after_clean.values())
    first_adversarial_backward = expected.index("B", 2)
    # Every forward between the clean backward and the first adversarial backward sees the
    # very same `.grad` tensors holding the clean gradient, bit for bit.
    for snapshot in spy.snapshots[1:expected[:first_adversarial_backward].count("F")]:
        for param_name, (ident, value) in snapshot.items():
            clean_ident, clean_value = after_clean[param_name]
            assert ident == clean_ident, param_name
            assert torch.equal(value, clean_value), param_name
