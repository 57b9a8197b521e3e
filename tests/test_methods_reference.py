"""FreeLB, SMART, VAT, R3F and AWP hand the optimizer the gradients of their paper formulas.

On tiny BERT in float64 with dropout off, ``.grad`` at ``on_before_optimizer_step`` must
equal the plain-PyTorch references of ``tests/reference_methods.py`` to 1e-10, with the
random starts drawn from a generator seeded like the callback's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_adv import AWP, R3F, SMART, VAT, FreeLB
from tests import reference_methods as ref
from tests.helpers import Classifier, GradRecorder, clone, loader, make_batches, tiny_bert, trainer

SEED = 7


class LogitsClassifier(Classifier):
    """``training_step`` goes through ``compute_loss``, so the clean logits can be captured
    from the clean pass instead of recomputed."""

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.compute_loss(batch, batch_idx)["loss"]


@dataclass
class Case:
    callback: Callable[..., Any]
    arguments: dict[str, Any]
    reference: Callable[..., Any]
    expected: dict[str, Any]
    #: Adversarial forwards per micro-batch (clean logits not counted).
    passes: int
    accumulate: int = 1
    #: ``.grad`` if the perturbation were zero, as a multiple of the clean gradient.
    at_zero: float = 1.0
    #: AWP's ``params``.
    pattern: str | None = None


FREELB_DEFAULTS = dict(alpha=0.1, steps=3, init_magnitude=1.0, max_norm=0.6, norm="l2")

EMBEDDING_CASES = {
    # The SST-2 defaults of the authors' script.
    "freelb-defaults": Case(FreeLB, {}, ref.freelb_grads, FREELB_DEFAULTS, 3, at_zero=2.0),
    "freelb-linf-unbounded": Case(
        FreeLB, dict(steps=2, norm="linf", alpha=0.05, init_magnitude=0.05, max_norm=0.0),
        ref.freelb_grads,
        dict(steps=2, norm="linf", alpha=0.05, init_magnitude=0.05, max_norm=0.0), 2,
        at_zero=2.0,
    ),
    "freelb-linf-clean0": Case(
        FreeLB,
        dict(steps=3, norm="linf", alpha=0.05, init_magnitude=0.05, max_norm=0.06,
             clean_weight=0.0),
        ref.freelb_grads,
        dict(steps=3, norm="linf", alpha=0.05, init_magnitude=0.05, max_norm=0.06,
             clean_weight=0.0), 3, at_zero=1.0,
    ),
    "freelb-l2-relative-clean05": Case(
        FreeLB,
        dict(steps=2, alpha=0.05, init_magnitude=0.1, max_norm=0.08, clean_weight=0.5,
             epsilon_scale="relative", adv_weight=0.7),
        ref.freelb_grads,
        dict(steps=2, norm="l2", alpha=0.05, init_magnitude=0.1, max_norm=0.08,
             clean_weight=0.5, relative=True, adv_weight=0.7), 2, at_zero=1.2,
    ),
    "freelb-accumulate-clean05": Case(
        FreeLB, dict(steps=2, alpha=0.3, init_magnitude=0.5, max_norm=0.0, clean_weight=0.5),
        ref.freelb_grads,
        dict(steps=2, norm="l2", alpha=0.3, init_magnitude=0.5, max_norm=0.0,
             clean_weight=0.5), 2, accumulate=2, at_zero=1.5,
    ),
    # The paper's sizes give a regulariser of about 1e-10: lambda_s = 1e5 makes it visible.
    "smart-defaults": Case(
        SMART, dict(adv_weight=1e5), ref.smart_grads,
        dict(epsilon=1e-5, alpha=1e-3, steps=1, noise_std=1e-5, norm="linf", adv_weight=1e5),
        2,
    ),
    "smart-linf": Case(
        SMART, dict(epsilon=0.1, alpha=0.05, noise_std=0.02), ref.smart_grads,
        dict(epsilon=0.1, alpha=0.05, steps=1, noise_std=0.02, norm="linf"), 2,
    ),
    "smart-l2-steps2": Case(
        SMART, dict(epsilon=1.0, alpha=0.6, steps=2, noise_std=0.05, norm="l2"),
        ref.smart_grads,
        dict(epsilon=1.0, alpha=0.6, steps=2, noise_std=0.05, norm="l2"), 3,
    ),
    "vat-defaults": Case(
        VAT, {}, ref.vat_grads, dict(epsilon=5.0, xi=0.1, power_iterations=1), 2,
    ),
    "vat-power2-relative": Case(
        VAT, dict(epsilon=0.3, xi=0.01, power_iterations=2, epsilon_scale="relative"),
        ref.vat_grads, dict(epsilon=0.3, xi=0.01, power_iterations=2, relative=True), 3,
    ),
    "r3f-normal": Case(
        R3F, dict(epsilon=0.1, adv_weight=2.0), ref.r3f_grads,
        dict(epsilon=0.1, noise="normal", adv_weight=2.0), 1,
    ),
    "r3f-uniform-relative": Case(
        R3F, dict(epsilon=0.3, noise="uniform", epsilon_scale="relative"), ref.r3f_grads,
        dict(epsilon=0.3, noise="uniform", relative=True), 1,
    ),
}
KL_METHODS = (SMART, VAT, R3F)

AWP_PATTERN = r"attention\.self\.value|intermediate|classifier"
AWP_CASES = {
    "awp-defaults": Case(AWP, {}, ref.awp_grads,
                         dict(adv_lr=1.0, adv_epsilon=0.01, steps=1), 1, at_zero=2.0),
    "awp-steps2-params": Case(
        AWP, dict(adv_lr=0.1, adv_epsilon=0.5, steps=2, params=AWP_PATTERN), ref.awp_grads,
        dict(adv_lr=0.1, adv_epsilon=0.5, steps=2), 2, at_zero=2.0, pattern=AWP_PATTERN,
    ),
    "awp-accumulate": Case(
        AWP, dict(adv_lr=0.02, adv_epsilon=0.05, adv_weight=0.5), ref.awp_grads,
        dict(adv_lr=0.02, adv_epsilon=0.05, steps=1, adv_weight=0.5), 1, accumulate=2,
        at_zero=1.5,
    ),
}


class ForwardCounter:
    def __init__(self, model: torch.nn.Module) -> None:
        self.count = 0
        model.register_forward_pre_hook(self._count)

    def _count(self, module: torch.nn.Module, args: Any) -> None:
        self.count += 1


def _fit(module: Classifier, callback: Any, batches: list[dict[str, Tensor]],
         accumulate: int) -> dict[str, Tensor | None]:
    recorder = GradRecorder()
    trainer([callback, recorder], max_steps=1, accumulate_grad_batches=accumulate).fit(
        module, loader(batches)
    )
    assert len(recorder.grads) == 1
    return recorder.grads[0]


def _assert_matches(got: dict[str, Tensor | None], want: dict[str, Tensor | None]) -> None:
    assert set(got) == {"model." + name for name in want}
    for name, expected in want.items():
        actual = got["model." + name]
        assert (actual is None) == (expected is None), name
        if expected is not None:
            torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10, msg=name)


def _assert_not_trivial(want: dict[str, Tensor | None], clean: dict[str, Tensor | None],
                        at_zero: float) -> None:
    """The attack moves the gradient well away from what a zero perturbation gives."""
    names = [name for name, value in want.items() if value is not None]
    target = torch.cat([want[name].reshape(-1) for name in names])
    zero = at_zero * torch.cat([clean[name].reshape(-1) for name in names])
    assert (target - zero).norm() > 1e-3 * zero.norm()


# SMART, VAT and R3F run twice: clean logits received from the clean pass, or recomputed.
RUNS = [
    (name, logits)
    for name, case in sorted(EMBEDDING_CASES.items())
    for logits in (["captured", "recomputed"] if case.callback in KL_METHODS else ["captured"])
]


@pytest.mark.parametrize(("name", "logits"), RUNS)
def test_embedding_methods_match_reference(name, logits):
    case = EMBEDDING_CASES[name]
    model = tiny_bert()
    batches = make_batches(case.accumulate, seed=11)

    module_cls = LogitsClassifier if logits == "captured" else Classifier
    module = module_cls(clone(model))
    forwards = ForwardCounter(module.model)
    callback = case.callback(seed=SEED, loss_fn="compute_loss", warn_on_collapse=False,
                             **case.arguments)
    got = _fit(module, callback, batches, case.accumulate)

    want = case.reference(clone(model), batches, seed=SEED, accumulate=case.accumulate,
                          **case.expected)
    _assert_matches(got, want)
    clean = ref.clean_grads(clone(model), batches, scale=1 / case.accumulate)
    _assert_not_trivial(want, clean, case.at_zero)
    # Recomputing the clean logits costs one forward per micro-batch; receiving them, none.
    extra = 1 if logits == "recomputed" else 0
    assert forwards.count == case.accumulate * (1 + case.passes + extra)


@pytest.mark.parametrize("name", sorted(AWP_CASES))
def test_awp_matches_reference(name):
    case = AWP_CASES[name]
    model = tiny_bert()
    batches = make_batches(case.accumulate, seed=11)
    module = Classifier(clone(model))
    forwards = ForwardCounter(module.model)
    callback = case.callback(warn_on_collapse=False, **case.arguments)
    got = _fit(module, callback, batches, case.accumulate)

    names = ref.awp_weights(model, case.pattern)
    if case.pattern is not None:
        layer = "bert.encoder.layer.0."
        assert names == [
            f"{layer}{module}.{kind}"
            for module in ("attention.self.value", "intermediate.dense")
            for kind in ("weight", "bias")
        ] + ["classifier.weight", "classifier.bias"]
    want = case.reference(clone(model), batches, names=names, accumulate=case.accumulate,
                          **case.expected)
    _assert_matches(got, want)
    clean = ref.clean_grads(clone(model), batches, scale=1 / case.accumulate)
    _assert_not_trivial(want, clean, case.at_zero)
    assert forwards.count == case.accumulate * (1 + case.passes)

