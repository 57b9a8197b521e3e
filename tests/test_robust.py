"""``RobustAccuracy``: accuracy under attack during validation and test.

The model is a tiny BERT trained for a few dozen steps on a task it can solve exactly
(label 1 when a marker token occurs), so its clean accuracy is 1.0 and an attack has
something to take away. Where a test needs a clean accuracy well below 1.0, most labels
of the evaluation set are flipped.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from lightning_adv import RobustAccuracy
from tests.helpers import QUIET_TRAINER_YAML, loader, trainer

VOCAB = 40
PAD = 0
MARKER = 5
SEQ_LEN = 8
KEYS = ("val_robust_acc", "val_robust_acc_clean", "test_robust_acc", "test_robust_acc_clean")

Batch = dict[str, Tensor]


def marker_task(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(input_ids, attention_mask, labels)``: label 1 exactly when ``MARKER`` occurs."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(MARKER + 1, VOCAB, (n, SEQ_LEN), generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    where = torch.randint(0, SEQ_LEN - 2, (n,), generator=generator)
    positive = labels == 1
    ids[positive, where[positive]] = MARKER
    lengths = torch.randint(4, SEQ_LEN + 1, (n,), generator=generator)
    lengths = torch.maximum(lengths, where + 1)
    mask = torch.arange(SEQ_LEN)[None, :] < lengths[:, None]
    return ids.masked_fill(~mask, PAD), mask.long(), labels


def eval_batches(flip: float = 0.0, n: int = 64, batch_size: int = 16) -> list[Batch]:
    """Held-out batches of the marker task; a share ``flip`` of the labels is inverted."""
    ids, mask, labels = marker_task(n, seed=1)
    flipped = torch.rand(n, generator=torch.Generator().manual_seed(2)) < flip
    labels = torch.where(flipped, 1 - labels, labels)
    return [
        {"input_ids": ids[i:i + batch_size], "attention_mask": mask[i:i + batch_size],
         "labels": labels[i:i + batch_size]}
        for i in range(0, n, batch_size)
    ]


def build_bert(seed: int = 0, hidden: int = 32) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=16, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=PAD,
    )
    return BertForSequenceClassification(config)


def train_bert(steps: int = 60) -> BertForSequenceClassification:
    """A tiny BERT fitted to the marker task with a plain loop (about a second)."""
    model = build_bert()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        ids, mask, labels = marker_task(32, seed=100 + step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


class Evaluated(pl.LightningModule):
    """A classifier whose loss method counts its calls and the batches it saw.

    ``validation_step`` and ``test_step`` call the network directly, so every call of
    :meth:`compute_loss` comes from the callback.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss_calls: list[int] = []
        self.autocast: list[bool] = []
        self.training_seen: list[bool] = []

    def compute_loss(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        self.loss_calls.append(batch_idx)
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        self.training_seen.append(self.training)
        out = self.model(**batch)
        return {"loss": out.loss, "logits": out.logits}

    def loss_only(self, batch: Batch, batch_idx: int) -> Tensor:
        return self.model(**batch).loss

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self.model(**batch).loss

    def _accuracy(self, batch: Batch) -> Tensor:
        logits = self.model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits
        return (logits.argmax(dim=-1) == batch["labels"]).float().mean()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.log("val_acc", self._accuracy(batch))

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.log("test_acc", self._accuracy(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.fixture(scope="module")
def trained_bert() -> BertForSequenceClassification:
    return train_bert()


@pytest.fixture
def module(trained_bert: BertForSequenceClassification) -> Evaluated:
    return Evaluated(copy.deepcopy(trained_bert))


def validate(module: pl.LightningModule, callbacks: list[pl.Callback],
             batches: list[Batch], **kwargs: Any) -> dict[str, float]:
    results = trainer(callbacks, **kwargs).validate(module, loader(batches), verbose=False)
    return {key: float(value) for key, value in results[0].items()}


def test_trained_model_is_accurate(module: Evaluated) -> None:
    # The premise of the attack tests: there is accuracy to lose.
    metrics = validate(module, [], eval_batches())
    assert metrics["val_acc"] == 1.0


# -- accuracy under attack against clean accuracy ---------------------------------------

# One validation run evaluates several attacks: each instance logs under its own name.
ATTACKS: dict[str, dict[str, Any]] = {
    "pgd_small": {"epsilon": 0.3},
    "pgd_large": {"epsilon": 3.0},
    "pgd_relative": {"epsilon": 1.0, "epsilon_scale": "relative"},
    # alpha=0: only the random start, which moves wrong predictions as often as right ones.
    "noise_only": {"epsilon": 30.0, "alpha": 0.0},
}


@pytest.mark.parametrize("flip", [0.0, 0.7], ids=["true-labels", "most-flipped"])
def test_never_above_clean_accuracy(module: Evaluated, flip: float) -> None:
    callbacks: list[pl.Callback] = [
        RobustAccuracy(name=name, **kwargs) for name, kwargs in ATTACKS.items()
    ]
    metrics = validate(module, callbacks, eval_batches(flip))
    for name in ATTACKS:
        assert metrics[f"val_{name}_clean"] == pytest.approx(metrics["val_acc"])
        assert 0.0 <= metrics[f"val_{name}"] <= metrics[f"val_{name}_clean"], name


def test_epsilon_zero_equals_clean_accuracy(module: Evaluated) -> None:
    callbacks: list[pl.Callback] = [
        RobustAccuracy(epsilon=0.0, epsilon_scale=scale, name=scale)
        for scale in ("absolute", "relative")
    ]
    metrics = validate(module, callbacks, eval_batches(flip=0.3))
    assert 0.5 < metrics["val_acc"] < 0.9  # the flipped labels make equality informative
    for scale in ("absolute", "relative"):
        assert metrics[f"val_{scale}_clean"] == pytest.approx(metrics["val_acc"])
        assert metrics[f"val_{scale}"] == metrics[f"val_{scale}_clean"]


def test_large_epsilon_lowers_accuracy(module: Evaluated) -> None:
    callbacks: list[pl.Callback] = [
        RobustAccuracy(epsilon=0.05, name="small"),
        RobustAccuracy(epsilon=2.0, name="large"),
    ]
    metrics = validate(module, callbacks, eval_batches())
    assert metrics["val_small_clean"] == metrics["val_large_clean"] == 1.0
    assert metrics["val_small"] >= 0.9
    assert metrics["val_large"] <= 0.5


def test_gradient_steps_beat_their_random_start(module: Evaluated) -> None:
    # alpha=0 keeps the random start only: ascent must do markedly worse for the model.
    callbacks: list[pl.Callback] = [
        RobustAccuracy(epsilon=1.0, name="ascent"),
        RobustAccuracy(epsilon=1.0, alpha=0.0, name="start"),
    ]
    metrics = validate(module, callbacks, eval_batches())
    assert metrics["val_ascent"] <= metrics["val_start"] - 0.3


# -- nothing left changed -----------------------------------------------------------------

def _inputs(batch: Batch) -> Batch:
    return {key: batch[key].clone() for key in ("input_ids", "attention_mask")}


def _probe(model: BertForSequenceClassification, batch: Batch) -> tuple[Tensor, Tensor]:
    """Word-embedding output and logits of ``batch``, computed with gradient enabled (as an
    attack pass would be), outside any inference mode."""
    with torch.inference_mode(False), torch.enable_grad():
        inputs = _inputs(batch)
        embedded = model.bert.embeddings.word_embeddings(inputs["input_ids"])
        logits = model(**inputs).logits
    return embedded.detach(), logits.detach()


Snapshot = dict[str, tuple[Tensor, Tensor | None]]


def _snapshot(module: pl.LightningModule) -> Snapshot:
    return {
        name: (p.detach().clone(), None if p.grad is None else p.grad.detach().clone())
        for name, p in module.named_parameters()
    }


def _assert_unchanged(module: pl.LightningModule, before: Snapshot) -> None:
    params = dict(module.named_parameters())
    assert set(before) == set(params)
    for name, (value, grad) in before.items():
        assert torch.equal(params[name].detach(), value), f"{name} changed"
        if grad is None:
            assert params[name].grad is None, f"{name}.grad was created"
        else:
            assert params[name].grad is not None, f"{name}.grad was cleared"
            assert torch.equal(params[name].grad, grad), f"{name}.grad changed"


class GradGuard(pl.Callback):
    """Around the callbacks placed between ``before`` and ``after`` in the callback list:
    ``before`` gives every parameter a random ``.grad`` (or none) and snapshots parameters
    and gradients; ``after`` asserts they are bitwise the same and that the embedding
    output and the logits of the batch are those of the untouched model.

    Lightning clears ``.grad`` when evaluation starts, hence the check per batch.
    """

    def __init__(self, reference: list[tuple[Tensor, Tensor]], fill: bool) -> None:
        self.reference = reference
        self.fill = fill
        self.checked = 0
        self._before: Snapshot = {}

    def before(self) -> pl.Callback:
        return _Hook(self._start)

    def after(self) -> pl.Callback:
        return _Hook(self._check)

    def _start(self, pl_module: pl.LightningModule, batch: Batch, batch_idx: int) -> None:
        generator = torch.Generator().manual_seed(batch_idx)
        with torch.inference_mode(False):
            for p in pl_module.parameters():
                p.grad = (torch.randn(p.shape, generator=generator, dtype=p.dtype)
                          if self.fill else None)
        self._before = _snapshot(pl_module)

    def _check(self, pl_module: pl.LightningModule, batch: Batch, batch_idx: int) -> None:
        _assert_unchanged(pl_module, self._before)
        embedded, logits = _probe(pl_module.model, batch)
        want_embedded, want_logits = self.reference[batch_idx]
        assert torch.equal(embedded, want_embedded)
        assert torch.equal(logits, want_logits)
        self.checked += 1


class _Hook(pl.Callback):
    def __init__(self, action: Any) -> None:
        self.action = action

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                outputs: Any, batch: Batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self.action(pl_module, batch, batch_idx)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                          outputs: Any, batch: Batch, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        self.action(pl_module, batch, batch_idx)


@pytest.mark.parametrize("fill", [True, False], ids=["grads-set", "grads-none"])
def test_parameters_grads_and_embedding_untouched(module: Evaluated, fill: bool) -> None:
    batches = eval_batches(flip=0.3)
    reference = [_probe(module.model.eval(), batch) for batch in batches]
    guard = GradGuard(reference, fill)
    attack = RobustAccuracy(epsilon=2.0, steps=3)
    run = trainer([guard.before(), attack, guard.after()])

    run.validate(module, loader(batches), verbose=False)
    run.test(module, loader(batches), verbose=False)

    assert guard.checked == 2 * len(batches)
    assert len(module.loss_calls) == 2 * len(batches) * (attack.steps + 2)
    embedding = module.model.bert.embeddings.word_embeddings
    assert not embedding._forward_hooks  # detached at teardown
    for batch, want in zip(batches, reference, strict=True):
        got = _probe(module.model, batch)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_attacks_in_eval_mode_and_restores_the_mode(module: Evaluated) -> None:
    # A hook before the callback leaves the module in training mode (as a Monte Carlo
    # dropout evaluation would): the attack still runs in eval mode, and the mode is kept.
    modes_after: list[bool] = []

    def to_train(pl_module: pl.LightningModule, batch: Batch, batch_idx: int) -> None:
        pl_module.train()

    def record(pl_module: pl.LightningModule, batch: Batch, batch_idx: int) -> None:
        modes_after.append(pl_module.training)

    callbacks = [_Hook(to_train), RobustAccuracy(epsilon=1.0, steps=1), _Hook(record)]
    validate(module, callbacks, eval_batches())
    assert module.training_seen and not any(module.training_seen)
    assert modes_after == [True] * len(eval_batches())


# -- logging ------------------------------------------------------------------------------

def test_logged_keys_in_fit_validate_and_test(module: Evaluated) -> None:
    batches = eval_batches(flip=0.3)
    run = trainer([RobustAccuracy(epsilon=0.5, steps=2)], max_epochs=1,
                  limit_train_batches=2, num_sanity_val_steps=1)
    run.fit(module, loader(batches), loader(batches))
    fitted = {key: float(value) for key, value in run.callback_metrics.items()}
    validated = run.validate(module, loader(batches), verbose=False)[0]
    tested = run.test(module, loader(batches), verbose=False)[0]

    for key in KEYS[:2]:
        assert key in fitted and key in validated
        assert 0.0 <= float(validated[key]) <= 1.0
    for key in KEYS[2:]:
        assert key in tested
        assert 0.0 <= float(tested[key]) <= 1.0
    assert float(validated["val_robust_acc_clean"]) == pytest.approx(float(validated["val_acc"]))
    assert float(tested["test_robust_acc_clean"]) == pytest.approx(float(tested["test_acc"]))
    assert fitted["val_robust_acc_clean"] == pytest.approx(fitted["val_acc"])


def test_name_sets_the_logged_keys(module: Evaluated) -> None:
    callbacks: list[pl.Callback] = [
        RobustAccuracy(epsilon=0.0, steps=1, name="robust_small"),
        RobustAccuracy(epsilon=1.0, steps=1, name="robust_large"),
    ]
    metrics = validate(module, callbacks, eval_batches())
    for name in ("robust_small", "robust_large"):
        assert f"val_{name}" in metrics and f"val_{name}_clean" in metrics
    assert "val_robust_acc" not in metrics


# -- how much is attacked -----------------------------------------------------------------

@pytest.mark.parametrize("max_batches", [1, 3, None])
def test_max_batches_limits_the_attacked_batches(module: Evaluated,
                                                 max_batches: int | None) -> None:
    steps, batches = 2, eval_batches()
    attacked = len(batches) if max_batches is None else max_batches
    run = trainer([RobustAccuracy(epsilon=0.5, steps=steps, max_batches=max_batches)],
                  max_epochs=2, limit_train_batches=1, num_sanity_val_steps=2)
    run.fit(module, loader(batches), loader(batches))

    # Per attacked batch: one clean forward, `steps` ascent forwards, one final forward.
    # The sanity check is not attacked, only its first batch checked with one forward; the
    # count restarts every epoch.
    per_epoch = list(range(attacked))
    expected = [i for i in per_epoch for _ in range(steps + 2)]
    assert module.loss_calls == [0] + expected * 2


def test_max_batches_applies_to_test_too(module: Evaluated) -> None:
    run = trainer([RobustAccuracy(epsilon=0.5, steps=1, max_batches=2)])
    run.test(module, loader(eval_batches()), verbose=False)
    assert sorted(set(module.loss_calls)) == [0, 1]
    assert len(module.loss_calls) == 2 * 3


# -- precision ----------------------------------------------------------------------------

def test_bf16_mixed(module: Evaluated) -> None:
    batches = eval_batches(flip=0.3)
    reference = [_probe(module.model.eval(), batch) for batch in batches]
    guard = GradGuard(reference, fill=True)
    callbacks: list[pl.Callback] = [
        guard.before(),
        RobustAccuracy(epsilon=0.0, steps=2, name="zero"),
        RobustAccuracy(epsilon=2.0, steps=2, name="large"),
        guard.after(),
    ]
    metrics = validate(module, callbacks, batches, precision="bf16-mixed")

    assert guard.checked == len(batches)
    assert len(module.autocast) == 2 * len(batches) * 4
    assert all(module.autocast)  # every attack pass ran under the trainer's autocast
    for name in ("zero", "large"):
        robust, clean = metrics[f"val_{name}"], metrics[f"val_{name}_clean"]
        assert 0.0 <= robust <= clean <= 1.0
        assert clean == pytest.approx(metrics["val_acc"])
    assert metrics["val_zero"] == metrics["val_zero_clean"]


# -- LightningCLI -------------------------------------------------------------------------

class CliModule(Evaluated):
    """Builds its own untrained network and validation data, so YAML alone describes it."""

    def __init__(self, hidden_size: int = 16, batches: int = 2) -> None:
        super().__init__(build_bert(hidden=hidden_size))
        self.batches = batches

    def val_dataloader(self) -> DataLoader[Any]:
        return loader(eval_batches()[: self.batches])


CLI_YAML = QUIET_TRAINER_YAML + """\
  callbacks:
    - class_path: lightning_adv.RobustAccuracy
      init_args:
        epsilon: 0.5
        alpha: 0.2
        steps: 2
        max_batches: 1
        loss_fn: compute_loss
        label_key: labels
        epsilon_scale: relative
        name: adv_acc
        seed: 7
"""


def test_configured_from_lightning_cli_yaml(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["prog"])
    config = tmp_path / "config.yaml"
    config.write_text(CLI_YAML)
    cli = LightningCLI(CliModule, args=["validate", "--config", str(config)],
                       save_config_callback=None)

    found = [cb for cb in cli.trainer.callbacks if isinstance(cb, RobustAccuracy)]
    assert len(found) == 1
    callback = found[0]
    assert (callback.epsilon, callback.alpha, callback.steps) == (0.5, 0.2, 2)
    assert (callback.max_batches, callback.loss_fn, callback.label_key) == (
        1, "compute_loss", "labels")
    assert (callback.epsilon_scale, callback.name, callback.seed) == ("relative", "adv_acc", 7)
    assert "val_adv_acc" in cli.trainer.callback_metrics
    assert "val_adv_acc_clean" in cli.trainer.callback_metrics
    assert len(cli.model.loss_calls) == 1 * (2 + 2)


def test_cli_rejects_a_bad_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["prog"])
    config = tmp_path / "config.yaml"
    config.write_text(CLI_YAML.replace("epsilon_scale: relative", "epsilon_scale: percent"))
    with pytest.raises(SystemExit):
        LightningCLI(CliModule, args=["validate", "--config", str(config)],
                     save_config_callback=None)


# -- errors -------------------------------------------------------------------------------

def test_missing_loss_method_is_named(module: Evaluated) -> None:
    with pytest.raises(RuntimeError, match=r"loss_fn='predict_loss'.*has no method"):
        validate(module, [RobustAccuracy(loss_fn="predict_loss")], eval_batches())


def test_missing_label_key_is_named(module: Evaluated) -> None:
    with pytest.raises(RuntimeError, match=r"label_key='target'.*'input_ids'"):
        validate(module, [RobustAccuracy(label_key="target")], eval_batches())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"label_key": "target"}, r"label_key='target'"),
    ({"loss_fn": "loss_only"}, r"returned Tensor without logits"),
    ({"label_key": "input_ids"}, r"must be \(16,\) class ids, .*'input_ids'.* of shape "
                                 r"\(16, \d+\)"),
])
def test_a_wrong_batch_or_loss_method_fails_in_the_sanity_check(
        module: Evaluated, kwargs: dict[str, Any], message: str) -> None:
    steps: list[int] = []

    class Steps(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            steps.append(trainer.global_step)

    batches = eval_batches()
    with pytest.raises(RuntimeError, match=message):
        trainer([RobustAccuracy(**kwargs), Steps()], max_epochs=1).fit(
            module, loader(batches), loader(batches))
    assert steps == []  # before the first training step


def test_loss_method_without_logits_is_explained(module: Evaluated) -> None:
    with pytest.raises(RuntimeError, match=r"`loss_only` returned Tensor without logits"):
        validate(module, [RobustAccuracy(loss_fn="loss_only")], eval_batches())


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"epsilon": -1.0}, ValueError),
        ({"steps": 0}, ValueError),
        ({"max_batches": 0}, ValueError),
        ({"epsilon_scale": "percent"}, ValueError),
        ({"loss_fn": "not a name"}, TypeError),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, Any],
                                            error: type[Exception]) -> None:
    with pytest.raises(error):
        RobustAccuracy(**kwargs)


def test_run_without_validation_batches_warns_that_nothing_was_measured(module):
    robust = RobustAccuracy(epsilon=0.1, steps=1)
    fit = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=[robust])
    with pytest.warns(UserWarning, match="RobustAccuracy measured nothing during fit"):
        fit.fit(module, DataLoader(eval_batches(n=16), batch_size=None))
