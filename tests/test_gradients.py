"""Contract 1-3 and 9: the gradients reaching the optimizer match the reference formulas."""

from __future__ import annotations

import pytest
import torch

from lightning_adv import FGM, FGSM, PGD
from tests import reference
from tests.helpers import Classifier, GradRecorder, clone, loader, make_batches, tiny_bert, trainer

METHODS = {
    "fgm": (FGM, {"epsilon": 1.0}),
    "fgsm": (FGSM, {"epsilon": 0.05}),
    "pgd": (PGD, {"epsilon": 1.0, "alpha": 0.4, "steps": 3}),
}


def _reference(model, batches, method, target, **kwargs):
    args = dict(METHODS[method][1])
    args.update(kwargs)
    fn = reference.weight_target_grads if target == "weight" else reference.output_target_grads
    return fn(clone(model), batches, method, **args)


def _run(model, batches, callback, **trainer_kwargs):
    recorder = GradRecorder()
    module = Classifier(clone(model))
    trainer(
        [callback, recorder], max_steps=len(recorder.grads) + 1, **trainer_kwargs
    ).fit(module, loader(batches))
    return recorder.grads[0]


def _assert_close(got, want):
    for name, expected in want.items():
        actual = got["model." + name]
        if expected is None:
            assert actual is None, name
            continue
        assert actual is not None, name
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("target", ["weight", "output"])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("adv_weight", [1.0, 0.5])
def test_gradients_match_reference(method, target, adv_weight):
    model = tiny_bert()
    batches = make_batches(1)
    cls, args = METHODS[method]
    got = _run(model, batches, cls(target=target, adv_weight=adv_weight, **args))
    want = _reference(model, batches, method, target, adv_weight=adv_weight)
    _assert_close(got, want)
    # The attack is not a no-op: the adversarial part is a sizeable share of the gradient.
    clean = _reference(model, batches, method, target, adv_weight=0.0)
    emb = "bert.embeddings.word_embeddings.weight"
    assert not torch.allclose(want[emb], (1 + adv_weight) * clean[emb], atol=1e-6)


@pytest.mark.parametrize("target", ["weight", "output"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_accumulation_uses_each_micro_batch_gradient(method, target):
    model = tiny_bert()
    batches = make_batches(2)
    cls, args = METHODS[method]
    got = _run(model, batches, cls(target=target, **args), accumulate_grad_batches=2)
    want = _reference(model, batches, method, target, accumulate=2)
    _assert_close(got, want)


@pytest.mark.parametrize("target", ["weight", "output"])
@pytest.mark.parametrize("cls", [FGM, FGSM, PGD])
def test_zero_epsilon_with_dropout_doubles_the_clean_gradient(cls, target):
    model = tiny_bert(dropout=0.3)
    batches = make_batches(1)
    torch.manual_seed(5)
    got = _run(model, batches, cls(epsilon=0.0, target=target))
    torch.manual_seed(5)
    clean = _run(model, batches, FGM(epsilon=0.0, adv_weight=0.0, target=target))
    for name, value in clean.items():
        if value is None:
            assert got[name] is None
        else:
            torch.testing.assert_close(got[name], 2 * value, rtol=0, atol=1e-12, msg=name)


def test_unused_parameters_keep_none_grad():
    model = tiny_bert()
    model.bert.pooler.dense.weight.requires_grad_(False)
    for p in model.bert.encoder.layer[0].output.parameters():
        p.requires_grad_(False)
    batches = make_batches(1)
    got = _run(model, batches, PGD(target="output"))
    assert got["model.bert.pooler.dense.weight"] is None
    assert got["model.bert.encoder.layer.0.output.dense.weight"] is None
    assert got["model.bert.pooler.dense.bias"] is not None
