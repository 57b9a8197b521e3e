"""The Lightning behaviour the callbacks rely on, and callbacks that share a Trainer.

If one of these fails after a Lightning upgrade, revisit ``lightning_adv/_lightning.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_adv import FGM, PGD, _lightning
from tests import reference
from tests.helpers import Classifier, GradRecorder, clone, loader, make_batches, tiny_bert, trainer


class _Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: counts the calls of its forward."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def test_forward_redirection_routes_any_method_through_the_wrapper():
    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    module = Classifier(tiny_bert())
    wrapper = _Wrapper(module)
    batch = make_batches(1)[0]
    loss = _ForwardRedirection()(wrapper, module, "compute_loss", batch, 0)["loss"]
    assert wrapper.calls == 1
    torch.testing.assert_close(loss, module.compute_loss(batch, 0)["loss"])


def test_call_through_wrapper_uses_the_strategy_model():
    module = Classifier(tiny_bert())
    wrapper = _Wrapper(module)

    class Strategy:
        model = wrapper

    class Trainer:
        strategy = Strategy()

    _lightning.call_through_wrapper(Trainer(), module, "compute_loss", make_batches(1)[0], 0)
    assert wrapper.calls == 1


def test_two_callbacks_on_one_step_each_use_their_own_clean_gradient():
    model = tiny_bert()
    batches = make_batches(1)
    fgm, pgd = FGM(epsilon=1.0), PGD(epsilon=1.0, alpha=0.4, steps=3)
    recorder = GradRecorder()
    trainer([fgm, pgd, recorder], max_steps=1).fit(Classifier(clone(model)), loader(batches))
    got = recorder.grads[0]

    with_fgm = reference.weight_target_grads(clone(model), batches, "fgm", epsilon=1.0)
    with_pgd = reference.weight_target_grads(clone(model), batches, "pgd", epsilon=1.0,
                                             alpha=0.4, steps=3)
    clean = reference.weight_target_grads(clone(model), batches, "fgm", epsilon=1.0,
                                          adv_weight=0.0)
    for name, value in clean.items():
        if value is None:
            continue
        expected = with_fgm[name] + with_pgd[name] - value
        torch.testing.assert_close(got["model." + name], expected, rtol=0, atol=1e-10)
