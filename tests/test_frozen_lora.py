"""The output target needs no gradient of the embedding weight.

With the word embeddings frozen (``requires_grad_(False)``), or wrapped by a peft LoRA
layer with the base weights frozen, every embedding-perturbing method still trains: the
gradients reaching the optimizer equal the plain-PyTorch references (which perturb
``inputs_embeds``), the adversarial part is not a no-op, and every frozen weight comes out
of a training step bit for bit unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_adv import FGM, PGD, R3F, SMART, VAT, FreeLB
from lightning_adv.embedding import find_embedding
from tests import reference_methods as ref
from tests.helpers import Classifier, GradRecorder, clone, loader, make_batches, tiny_bert, trainer

peft = pytest.importorskip("peft")

SEED = 5
Reference = Callable[[torch.nn.Module, list[dict[str, Tensor]]], dict[str, Any]]


class LogitsClassifier(Classifier):
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.compute_loss(batch, batch_idx)["loss"]


def _smart_args() -> dict[str, Any]:
    return dict(epsilon=0.3, alpha=0.2, steps=1, noise_std=0.05)


# name: (callback, reference, gradient at a zero perturbation as a multiple of the clean one)
METHODS: dict[str, tuple[Callable[[], Any], Reference, float]] = {
    "fgm": (lambda: FGM(epsilon=1.0, target="output"),
            lambda m, b: ref.pgd_grads(m, b, epsilon=1.0, alpha=1.0, steps=1), 2.0),
    "pgd": (lambda: PGD(epsilon=1.0, alpha=0.4, steps=3, target="output"),
            lambda m, b: ref.pgd_grads(m, b, epsilon=1.0, alpha=0.4, steps=3), 2.0),
    "freelb": (lambda: FreeLB(seed=SEED),
               lambda m, b: ref.freelb_grads(m, b, seed=SEED, alpha=0.1, steps=3,
                                             init_magnitude=1.0, max_norm=0.6, norm="l2"), 2.0),
    "smart": (lambda: SMART(seed=SEED, loss_fn="compute_loss", **_smart_args()),
              lambda m, b: ref.smart_grads(m, b, seed=SEED, norm="linf", **_smart_args()), 1.0),
    "vat": (lambda: VAT(seed=SEED, loss_fn="compute_loss", warn_on_collapse=False),
            lambda m, b: ref.vat_grads(m, b, seed=SEED, epsilon=5.0, xi=0.1,
                                       power_iterations=1), 1.0),
    "r3f": (lambda: R3F(epsilon=0.3, seed=SEED, loss_fn="compute_loss",
                        warn_on_collapse=False),
            lambda m, b: ref.r3f_grads(m, b, seed=SEED, epsilon=0.3, noise="normal"), 1.0),
}


def _frozen() -> torch.nn.Module:
    model = tiny_bert()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    return model


def _lora() -> torch.nn.Module:
    config = peft.LoraConfig(r=4, lora_alpha=8,
                             target_modules=["word_embeddings", "query", "value"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on LoRA for embeddings
        return peft.get_peft_model(tiny_bert(), config)


MODELS = {"frozen": _frozen, "lora": _lora}


def test_embedding_none_finds_the_base_embedding_of_a_peft_model():
    lora = _lora()
    name, embedding = find_embedding(Classifier(lora), None)
    wrapped = lora.base_model.model.bert.embeddings.word_embeddings
    assert isinstance(wrapped, peft.tuners.lora.Embedding)
    assert embedding is wrapped.base_layer
    assert name == "model.base_model.model.bert.embeddings.word_embeddings.base_layer"


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_frozen_or_lora_embeddings_still_train(method, kind):
    make_callback, make_reference, at_zero = METHODS[method]
    batches = make_batches(1, seed=3)
    model = MODELS[kind]()
    module = LogitsClassifier(clone(model), lr=0.1)
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    assert any("word_embeddings" in n for n in frozen) and trainable

    recorder = GradRecorder()
    trainer([make_callback(), recorder], max_steps=1).fit(module, loader(batches))
    got = recorder.grads[0]

    want = make_reference(clone(model), batches)
    clean = ref.clean_grads(clone(model), batches)
    adversarial_part = []
    for name, expected in want.items():
        actual = got["model." + name]
        if expected is None:
            assert actual is None, name
            continue
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10, msg=name)
        adversarial_part.append((expected - at_zero * clean[name]).reshape(-1))
    # The trainable parameters receive a gradient that a zero perturbation would not give.
    clean_norm = torch.cat([g.reshape(-1) for g in clean.values() if g is not None]).norm()
    assert torch.cat(adversarial_part).norm() > 1e-3 * clean_norm

    params = dict(module.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(params[name], before), name
    assert any(not torch.equal(params[n], before) for n, before in trainable.items())
