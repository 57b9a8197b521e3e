"""What SMART, VAT and R3F need from the loss method, and VAT on unlabelled data.

A loss method returning only a loss is an error at the first attacked step that says
what to return, and leaves the model as it was. VAT with ``batch_key="unlabeled"`` runs
its passes on that part of a combined batch only, for which the loss method returns
logits and no loss; a batch without the part is a clear error.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor

from lightning_adv import R3F, SMART, VAT
from tests import reference_methods as ref
from tests.helpers import Classifier, GradRecorder, clone, loader, make_batches, tiny_bert, trainer

SEED = 9
Batch = dict[str, Tensor]


class ParamsAtBatchStart(pl.Callback):
    def __init__(self) -> None:
        self.params: list[dict[str, Tensor]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self.params.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


@pytest.mark.parametrize("cls", [SMART, VAT, R3F])
def test_loss_without_logits_fails_at_the_first_attacked_step(cls):
    batches = make_batches(3)
    module = Classifier(tiny_bert(), lr=0.1)  # `training_step` returns a bare loss tensor
    watch = ParamsAtBatchStart()
    fit = trainer([watch, cls(start_step=1)], max_steps=3)
    with pytest.raises(RuntimeError) as error:
        fit.fit(module, loader(batches))

    message = str(error.value)
    assert "`training_step` returned Tensor without logits" in message
    assert "{'loss': loss, 'logits': logits}" in message and "loss_fn=" in message
    # Step 0 was not attacked and trained; the error came in step 1, before its update.
    assert fit.global_step == 1 and len(watch.params) == 2
    for name, param in module.named_parameters():
        assert torch.equal(param, watch.params[1][name]), name
    # Nothing is left applied to the embedding output.
    plain = clone(module.model)
    with torch.no_grad():
        assert torch.equal(module.model(**batches[0]).logits, plain(**batches[0]).logits)


def _unlabeled(n: int) -> list[Batch]:
    parts = make_batches(n, batch_size=6, seq_len=5, seed=21)
    return [{k: v for k, v in part.items() if k != "labels"} for part in parts]


class SemiSupervised(Classifier):
    """Trains on ``batch["labeled"]``; its loss method gives logits only for unlabelled
    parts. Records the ids of every forward of the model."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.0) -> None:
        super().__init__(model, lr)
        self.forwards: list[tuple[Tensor, bool]] = []
        model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, model: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        self.forwards.append((kwargs["input_ids"], torch.is_grad_enabled()))

    def training_step(self, batch: dict[str, Batch], batch_idx: int) -> Tensor:
        return self.compute_loss(batch["labeled"], batch_idx)["loss"]

    def compute_loss(self, part: Batch, batch_idx: int) -> Any:
        if "labels" in part:
            out = self.model(**part)
            return {"loss": out.loss, "logits": out.logits}
        out = self.model(input_ids=part["input_ids"], attention_mask=part["attention_mask"])
        return {"logits": out.logits}


def test_vat_trains_on_the_unlabelled_part_of_a_combined_batch():
    steps = 2
    labeled, unlabeled = make_batches(steps), _unlabeled(steps)
    combined = [{"labeled": a, "unlabeled": b} for a, b in zip(labeled, unlabeled, strict=True)]
    model = tiny_bert()
    module = SemiSupervised(clone(model), lr=0.5)
    recorder = GradRecorder()
    callback = VAT(epsilon=1.0, power_iterations=2, batch_key="unlabeled",
                   loss_fn="compute_loss", seed=SEED)
    trainer([callback, recorder], max_steps=steps).fit(module, loader(combined))

    # Per step: the clean pass on the labelled part; then, on the unlabelled part only,
    # the clean logits (no gradient), two power iterations and the adversarial pass.
    assert len(module.forwards) == steps * 5
    for step in range(steps):
        seen = module.forwards[5 * step: 5 * step + 5]
        assert torch.equal(seen[0][0], labeled[step]["input_ids"]) and seen[0][1]
        for ids, _ in seen[1:]:
            assert torch.equal(ids, unlabeled[step]["input_ids"])
        assert [grad for _, grad in seen] == [True, False, True, True, True]

    # The first update: the labelled loss plus VAT's term on the unlabelled part.
    want = ref.vat_grads(clone(model), labeled[:1], seed=SEED, epsilon=1.0, xi=0.1,
                         power_iterations=2, unlabeled=unlabeled[:1])
    for name, expected in want.items():
        torch.testing.assert_close(recorder.grads[0]["model." + name], expected, rtol=0,
                                   atol=1e-10, msg=name)
    clean = ref.clean_grads(clone(model), labeled[:1])
    head = "classifier.weight"
    assert (want[head] - clean[head]).norm() > 1e-3 * clean[head].norm()
    # And it trained: the weights moved and stayed finite.
    assert all(param.isfinite().all() for param in module.model.parameters())
    assert not torch.equal(module.model.classifier.weight, model.classifier.weight)


def test_vat_batch_without_the_key_is_a_clear_error():
    module = Classifier(tiny_bert())
    callback = VAT(batch_key="unlabeled", loss_fn="compute_loss")
    with pytest.raises(RuntimeError, match=r"`batch_key='unlabeled'` but the training batch "
                                           r"has no such part"):
        trainer([callback], max_steps=1).fit(module, loader(make_batches(1)))
