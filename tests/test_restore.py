"""Restore is exact: same storage, bitwise same values, tied weights stay tied, and only the
touched rows are ever copied; a failure in the middle of an attack leaves nothing perturbed.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import transformers as hf
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn

# TorchDispatchMode sees every aten op with its real inputs and outputs; it is the simplest
# way to tell whether a copy of the whole embedding matrix was made.
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_adv import FGM, FGSM, PGD, AdversarialCallback
from tests.helpers import PAD, VOCAB, Classifier, loader, make_batches, tiny_bert, trainer

METHODS = {
    "fgm": (FGM, {"epsilon": 0.5}),
    "fgsm": (FGSM, {"epsilon": 0.01}),
    "pgd": (PGD, {"epsilon": 0.5, "alpha": 0.2, "steps": 3}),
}


def make(method: str, target: str, cls: type[AdversarialCallback] | None = None,
         **kwargs: Any) -> AdversarialCallback:
    base, args = METHODS[method]
    return (cls or base)(target=target, **args, **kwargs)


class RestoreWatch(pl.Callback):
    """Checks the embedding weight around every optimizer step.

    The copy is taken at the first micro-batch after an optimizer step, so under gradient
    accumulation a micro-batch that left the weight perturbed is caught by the next one.
    A forward hook on every module holding the weight notes whether any pass of the step
    saw it differ from that copy, so a run that never attacked cannot pass for a restore.
    """

    def __init__(self, weight: nn.Parameter) -> None:
        self.weight = weight
        self.pointer = weight.data_ptr()
        self.before: Tensor | None = None
        self.equal_before_step: list[bool] = []
        self.same_storage: list[bool] = []
        self.perturbed_seen: list[bool] = []
        self.calls = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for module in pl_module.modules():
            if isinstance(module, nn.Embedding) and module.weight is self.weight:
                module.register_forward_hook(self._hook)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self.before is None:
            self.before = self.weight.detach().clone()
            self.perturbed_seen.append(False)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        assert self.before is not None
        self.equal_before_step.append(torch.equal(self.weight, self.before))
        self.before = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.same_storage.append(self.weight.data_ptr() == self.pointer)

    def _hook(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self.calls += 1
        if self.before is not None and not torch.equal(module.weight, self.before):
            self.perturbed_seen[-1] = True


def bert(dtype: torch.dtype = torch.float32) -> nn.Module:
    return tiny_bert(dtype=dtype)


# -- bitwise restore, same storage ------------------------------------------------------------


# bfloat16 only for the weight target: the output target never writes the weight.
BITWISE = [(m, t, torch.float32) for m in sorted(METHODS) for t in ("weight", "output")]
BITWISE += [(m, "weight", torch.bfloat16) for m in sorted(METHODS)]


@pytest.mark.parametrize(
    ("method", "target", "dtype"), BITWISE, ids=lambda value: str(value).split(".")[-1]
)
def test_restore_is_bitwise_in_the_same_storage(method, target, dtype):
    model = bert(dtype)
    weight = model.get_input_embeddings().weight
    start = weight.detach().clone()
    watch = RestoreWatch(weight)
    callback = make(method, target)
    trainer([callback, watch], max_steps=3).fit(Classifier(model, lr=0.1), loader(make_batches(3)))

    assert callback.attacked_steps == 3
    assert watch.equal_before_step == [True] * 3
    assert watch.same_storage == [True] * 3
    # The weight target moves the weight during its passes; the output target never does.
    assert watch.perturbed_seen == [target == "weight"] * 3
    assert model.get_input_embeddings().weight is weight
    assert not torch.equal(weight, start), "lr > 0: the optimizer should have moved the weight"


@pytest.mark.parametrize("target", ["weight", "output"])
def test_restore_under_accumulation_and_loss_scaling(target):
    model = bert()
    weight = model.get_input_embeddings().weight
    watch = RestoreWatch(weight)
    callback = make("pgd", target)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer(
        [callback, watch], max_steps=2, accumulate_grad_batches=2,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    ).fit(Classifier(model, lr=0.1), loader(make_batches(4)))

    # Every micro-batch attacked: a clean pass, two inner ascent steps and the final pass.
    assert watch.calls == 4 * 4
    assert watch.equal_before_step == [True, True]
    assert watch.same_storage == [True] * 4
    assert watch.perturbed_seen == [target == "weight"] * 2


# -- tied input and output embeddings ----------------------------------------------------------


def tied_gpt2() -> hf.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = hf.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                           bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
                           tie_word_embeddings=True)
    return hf.GPT2LMHeadModel(config)


def lm_batches(n: int) -> list[dict[str, Tensor]]:
    batches = make_batches(n)
    for batch in batches:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batches


class TiedWatch(pl.Callback):
    def __init__(self) -> None:
        self.tied: list[bool] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        model = pl_module.model
        wte, head = model.transformer.wte.weight, model.lm_head.weight
        self.tied.append(head is wte and head.data_ptr() == wte.data_ptr())


@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_tied_weights_stay_tied(method):
    model = tied_gpt2()
    wte = model.transformer.wte.weight
    assert model.lm_head.weight is wte
    start = wte.detach().clone()
    watch, tied = RestoreWatch(wte), TiedWatch()
    callback = make(method, "weight")
    trainer([callback, watch, tied], max_steps=4).fit(
        Classifier(model, lr=0.5), loader(lm_batches(4))
    )

    assert callback.attacked_steps == 4
    assert tied.tied == [True] * 4
    assert watch.equal_before_step == [True] * 4
    assert watch.same_storage == [True] * 4
    assert watch.perturbed_seen == [True] * 4
    assert model.lm_head.weight is model.transformer.wte.weight is wte
    assert not torch.equal(wte, start)


# -- only the touched rows are backed up --------------------------------------------------------


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


class WeightReads(TorchDispatchMode):
    """Largest new tensor made by an op that reads ``weight`` (views and in-place writes of
    the weight itself do not count)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.storage = weight.untyped_storage().data_ptr()
        self.largest = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        out = func(*args, **(kwargs or {}))
        inputs = _tensors(args) + _tensors(kwargs or {})
        if any(t.untyped_storage().data_ptr() == self.storage for t in inputs):
            for t in _tensors(out):
                if t.untyped_storage().data_ptr() != self.storage:
                    self.largest = max(self.largest, t.numel())
                    self.ops.append(f"{func}: {tuple(t.shape)}")
        return out


def _watched(cls: type[AdversarialCallback], weight: Tensor) -> type[AdversarialCallback]:
    class Watched(cls):  # type: ignore[misc, valid-type]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.reads: list[WeightReads] = []

        def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            mode = WeightReads(weight)
            with mode:
                super().on_after_backward(trainer, pl_module)
            self.reads.append(mode)

    return Watched


@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_weight_target_backs_up_only_touched_rows(method):
    torch.manual_seed(0)
    config = hf.BertConfig(vocab_size=4000, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=32, num_labels=3, pad_token_id=PAD)
    model = hf.BertForSequenceClassification(config)
    weight = model.get_input_embeddings().weight
    batches = make_batches(2)
    positions = batches[0]["input_ids"].numel()
    callback = make(method, "weight", cls=_watched(METHODS[method][0], weight))
    watch = RestoreWatch(weight)
    trainer([callback, watch], max_steps=2).fit(Classifier(model, lr=0.1), loader(batches))

    assert callback.attacked_steps == 2 and watch.perturbed_seen == [True, True]
    assert len(callback.reads) == 2
    for reads in callback.reads:
        assert reads.ops, "the spy saw no read of the weight"
        # One row per token position at most (the backup, the embedding lookup); a copy of
        # the whole V x d matrix would be 4000 x 16.
        assert reads.largest <= positions * weight.shape[1], reads.ops


# -- a failure in the middle of an attack -------------------------------------------------------


class Boom(Exception):
    pass


class FailingClassifier(Classifier):
    """Fails at call ``fail_call`` of ``training_step`` within batch ``fail_batch``; call 1
    is Lightning's clean pass, the later ones are the callback's."""

    def __init__(self, model: nn.Module, how: str, fail_call: int, fail_batch: int = 1) -> None:
        super().__init__(model, lr=0.1)
        self.how, self.fail_call, self.fail_batch = how, fail_call, fail_batch
        self.calls_in_batch = 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.calls_in_batch = 0

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Any:
        self.calls_in_batch += 1
        if batch_idx != self.fail_batch or self.calls_in_batch != self.fail_call:
            return super().training_step(batch, batch_idx)
        if self.how == "raise":
            raise Boom("the loss failed")
        if self.how == "no_loss":
            return {"logits": self.model(**batch).logits}
        if self.how == "extra_call":
            return self.model(**batch).loss + self.model(**batch).loss
        loss = self.model(**batch).loss
        loss.register_hook(_explode)  # how == "backward": fails inside the adversarial backward
        return loss


def _explode(grad: Tensor) -> Tensor:
    raise Boom("the backward failed")


FAILURES = [
    ("fgm", "raise", 2, Boom),
    ("fgm", "no_loss", 2, RuntimeError),
    ("fgm", "backward", 2, Boom),
    ("pgd", "raise", 2, Boom),  # the first inner ascent step
    ("pgd", "backward", 2, Boom),  # the inner gradient, taken with torch.autograd.grad
    ("pgd", "raise", 4, Boom),  # the final pass
    ("pgd", "backward", 4, Boom),
]


@pytest.mark.parametrize("target", ["weight", "output"])
@pytest.mark.parametrize(("method", "how", "fail_call", "error"), FAILURES)
def test_failure_mid_attack_leaves_weights_unperturbed(method, how, fail_call, error, target):
    _fails_cleanly(method, how, fail_call, error, target)


def test_output_target_failure_from_changed_call_count_leaves_weights_unperturbed():
    _fails_cleanly("fgm", "extra_call", 2, RuntimeError, "output", match="called differently")


def _fails_cleanly(method: str, how: str, fail_call: int, error: type[BaseException],
                   target: str, match: str | None = None) -> None:
    model = bert()
    weight = model.get_input_embeddings().weight
    watch = RestoreWatch(weight)
    callback = make(method, target)
    module = FailingClassifier(model, how, fail_call)
    batches = make_batches(3)
    with pytest.raises(error, match=match):
        trainer([callback, watch], max_steps=3).fit(module, loader(batches))

    assert module.calls_in_batch == fail_call, "the failure did not happen where intended"
    assert watch.equal_before_step == [True], "the first step should have trained normally"
    assert watch.before is not None and torch.equal(weight, watch.before)
    assert weight.data_ptr() == watch.pointer
    # A loss method raising at once fails before any forward could see the perturbed rows.
    seen = target == "weight" and not (how == "raise" and fail_call == 2)
    assert watch.perturbed_seen[-1] == seen

    # Nothing of the attack is left behind: the model computes what a hook-free copy does.
    fresh = tiny_bert(dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    batch = {k: v for k, v in batches[1].items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, fresh(**batch).logits)


@pytest.mark.parametrize("name", ["fgm", "smart", "awp", "robust"])
def test_failed_fit_leaves_no_hook_or_wrapper_behind(name):
    # Lightning runs `on_exception` but not `teardown` when fit fails; retrying in a
    # notebook must not stack hooks, and the module must still pickle.
    import io
    import pickle

    from lightning_adv import AWP, SMART, RobustAccuracy

    callbacks = {
        "fgm": lambda: FGM(epsilon=0.1),
        "smart": lambda: SMART(loss_fn="compute_loss"),
        "awp": lambda: AWP(),
        "robust": lambda: RobustAccuracy(epsilon=0.1, steps=1),
    }
    module = FailingClassifier(tiny_bert(dtype=torch.float32), "raise", fail_call=1)
    embedding = module.model.get_input_embeddings()
    for _ in range(2):
        with pytest.raises(Boom):
            trainer([callbacks[name]()], max_steps=3).fit(module, loader(make_batches(3)))
    assert not embedding._forward_hooks
    assert all(not p._backward_hooks for p in module.parameters())
    assert "compute_loss" not in vars(module)
    torch.save(module, io.BytesIO(), pickle_module=pickle)
