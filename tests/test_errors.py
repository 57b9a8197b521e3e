"""Bad input fails early with a message naming the argument, the value seen and the fix."""

from __future__ import annotations

import math
import re
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import Strategy
from torch import Tensor, nn

from lightning_adv import AWP, FGM, FGSM, PGD, R3F, SMART, VAT, FreeLB
from tests.helpers import (
    Classifier,
    ManualClassifier,
    clone,
    loader,
    make_batches,
    tiny_bert,
    trainer,
)

METHODS = [FGM, FGSM, PGD]


def _name(cls: type) -> str:
    return cls.__name__


# -- at construction -------------------------------------------------------------------


@pytest.mark.parametrize("cls", METHODS, ids=_name)
@pytest.mark.parametrize("value", [-1.0, -1e-9, math.nan, math.inf, -math.inf], ids=repr)
def test_epsilon_must_be_finite_and_non_negative(cls, value):
    pattern = rf"{_name(cls)}: `epsilon` must be a finite number >= 0, got {value!r}\. Pass"
    with pytest.raises(ValueError, match=pattern):
        cls(epsilon=value)


@pytest.mark.parametrize("cls", METHODS, ids=_name)
@pytest.mark.parametrize("value", ["0.1", True, None, [1.0]], ids=repr)
def test_epsilon_must_be_a_number(cls, value):
    pattern = (rf"{_name(cls)}: `epsilon` must be a number, got {type(value).__name__} "
               rf"{re.escape(repr(value))}\. Pass a value such as")
    with pytest.raises(TypeError, match=pattern):
        cls(epsilon=value)


@pytest.mark.parametrize("value", [-0.5, math.nan, math.inf], ids=repr)
def test_pgd_alpha_must_be_finite_and_non_negative(value):
    pattern = rf"PGD: `alpha` must be a finite number >= 0, got {value!r}\. Pass a value such as"
    with pytest.raises(ValueError, match=pattern):
        PGD(alpha=value)


@pytest.mark.parametrize("value", ["0.3", False])
def test_pgd_alpha_must_be_a_number(value):
    with pytest.raises(TypeError, match=r"PGD: `alpha` must be a number, got "):
        PGD(alpha=value)


@pytest.mark.parametrize("value", [0, -3])
def test_pgd_steps_at_least_one(value):
    with pytest.raises(ValueError, match=rf"PGD: `steps` must be >= 1, got {value}"):
        PGD(steps=value)


@pytest.mark.parametrize("value", [2.0, "3", True])
def test_pgd_steps_must_be_whole(value):
    with pytest.raises(TypeError, match=r"PGD: `steps` must be a whole number >= 1, got "):
        PGD(steps=value)


@pytest.mark.parametrize("cls", METHODS, ids=_name)
@pytest.mark.parametrize(("name", "value", "error", "message"), [
    ("every_n_steps", 0, ValueError, r"`every_n_steps` must be >= 1, got 0"),
    ("every_n_steps", -2, ValueError, r"`every_n_steps` must be >= 1, got -2"),
    ("every_n_steps", 1.5, TypeError, r"`every_n_steps` must be a whole number >= 1"),
    ("start_step", -1, ValueError, r"`start_step` must be >= 0, got -1"),
    ("start_step", "10", TypeError, r"`start_step` must be a whole number >= 0"),
    ("adv_weight", -1.0, ValueError, r"`adv_weight` must be a finite number >= 0"),
    ("adv_weight", math.nan, ValueError, r"`adv_weight` must be a finite number >= 0"),
    ("target", "embeddings", ValueError,
     r"`target` must be one of 'weight', 'output', got 'embeddings'"),
    ("target", None, ValueError, r"`target` must be one of 'weight', 'output', got None"),
    ("embedding", "", TypeError, r"`embedding` must be None or a module name"),
    ("embedding", 3, TypeError, r"`embedding` must be None or a module name"),
    ("embedding", nn.Embedding(3, 2), TypeError, r"`embedding` must be None or a module name"),
    ("loss_fn", "", TypeError, r"`loss_fn` must be the name of a LightningModule method"),
    ("loss_fn", "compute loss", TypeError,
     r"`loss_fn` must be the name of a LightningModule method"),
    ("loss_fn", None, TypeError, r"`loss_fn` must be the name of a LightningModule method"),
    ("loss_fn", len, TypeError, r"`loss_fn` must be the name of a LightningModule method"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_shared_argument_checked_at_construction(cls, name, value, error, message):
    with pytest.raises(error, match=rf"{_name(cls)}: {message}"):
        cls(**{name: value})


@pytest.mark.parametrize(("name", "value", "error", "message"), [
    ("seed", 2**70, ValueError, r"`seed` must be None or a whole number from 0 to 2\*\*63 - 1"),
    ("seed", -1, ValueError, r"`seed` must be None or a whole number from 0"),
    ("seed", "x", TypeError, r"`seed` must be None or a whole number from 0"),
    ("log_prefix", "", ValueError, r"`log_prefix` must be a non-empty name"),
    ("log_prefix", 5, ValueError, r"`log_prefix` must be a non-empty name"),
    ("log_prefix", "my prefix", ValueError, r"`log_prefix` must be a non-empty name"),
])
def test_seed_and_names_checked_at_construction(name, value, error, message):
    from lightning_adv import RobustAccuracy

    with pytest.raises(error, match=rf"FGM: {message}"):
        FGM(**{name: value})
    robust_name = "name" if name == "log_prefix" else name
    with pytest.raises(error, match=rf"RobustAccuracy: {message.replace(name, robust_name)}"):
        RobustAccuracy(**{robust_name: value})


@pytest.mark.parametrize(("name", "value"), [("target", "output"), ("embedding", "x")])
def test_awp_refuses_embedding_arguments(name, value):
    with pytest.raises(TypeError, match=rf"AWP: `{name}` does not apply"):
        AWP(**{name: value})
    AWP(target="weight", embedding=None)  # the defaults pass
    AWP(epsilon_scale="relative")  # AWP is relative by construction


def test_repr_shows_the_arguments():
    assert repr(PGD(epsilon=0.5, alpha=0.2, steps=2)) == (
        "PGD(epsilon=0.5, alpha=0.2, steps=2, target='weight', epsilon_scale='absolute', "
        "adv_weight=1.0, start_step=0, every_n_steps=1)")
    assert repr(AWP()).startswith("AWP(adv_lr=1.0, adv_epsilon=0.01, steps=1, params=None, "
                                  "adv_weight=1.0")


@pytest.mark.parametrize("cls", [FGM, FGSM, PGD, FreeLB, SMART, VAT, R3F, AWP], ids=_name)
def test_zero_adv_weight_warns_that_the_attack_does_nothing(cls):
    with pytest.warns(UserWarning, match=rf"{_name(cls)}: adv_weight=0 keeps the adversarial "
                      r"passes, and their cost, but adds nothing"):
        cls(adv_weight=0.0)


@pytest.mark.parametrize("name", ["replay_dropout", "warn_on_collapse"])
@pytest.mark.parametrize("value", ["false", "no", 0.0])
def test_flags_reject_values_that_are_not_bool(name, value):
    # `bool("false")` is True: a string flag would silently do the opposite of what it says.
    with pytest.raises(TypeError, match=rf"FGM: `{name}` must be True or False"):
        FGM(**{name: value})


# -- at setup, before the first step ---------------------------------------------------


class BatchCounter(pl.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.batches += 1


def _fails_before_training(module: Any, callback: Any, error: type[Exception], pattern: str,
                           **trainer_kwargs: Any) -> None:
    before = {k: v.clone() for k, v in module.state_dict().items()}
    counter = BatchCounter()
    with pytest.raises(error, match=pattern):
        trainer([callback, counter], max_steps=2, **trainer_kwargs).fit(
            module, loader(make_batches(2))
        )
    assert counter.batches == 0
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


def _module(**kwargs: Any) -> Classifier:
    return Classifier(tiny_bert(), lr=0.1, **kwargs)


WORD = re.escape("'model.bert.embeddings.word_embeddings'")


@pytest.mark.parametrize("cls", METHODS, ids=_name)
def test_embedding_matching_nothing_lists_the_embeddings(cls):
    pattern = (r"`embedding='word_embedding'` matches no `nn.Embedding` module.*"
               rf"`nn.Embedding` modules found: {WORD}, .*'model.bert.embeddings."
               r"position_embeddings'")
    _fails_before_training(_module(), cls(embedding="word_embedding"), RuntimeError, pattern)


class TwoWordEmbeddings(Classifier):
    def __init__(self) -> None:
        super().__init__(tiny_bert(), lr=0.1)
        self.extra = nn.ModuleDict({"word_embeddings": nn.Embedding(5, 4)})


@pytest.mark.parametrize("cls", METHODS, ids=_name)
def test_embedding_matching_several_lists_them(cls):
    pattern = (r"`embedding='word_embeddings'` matches 2 `nn.Embedding` module.*"
               rf"exactly one.*{WORD}.*'extra.word_embeddings'")
    _fails_before_training(TwoWordEmbeddings(), cls(embedding="word_embeddings"), RuntimeError,
                           pattern)


def test_embedding_path_naming_another_module_type():
    pattern = r"`embedding='model.bert.embeddings'` names a BertEmbeddings, not an `nn.Embedding`"
    _fails_before_training(_module(), FGM(embedding="model.bert.embeddings"), RuntimeError,
                           pattern)


class TwoModels(Classifier):
    def __init__(self) -> None:
        super().__init__(tiny_bert(), lr=0.1)
        self.teacher = tiny_bert(seed=1)


def test_several_input_embeddings_ask_for_embedding():
    pattern = (rf"several word embeddings.*{WORD}.*"
               r"'teacher.bert.embeddings.word_embeddings'.*Pass `embedding=`")
    _fails_before_training(TwoModels(), FGM(), RuntimeError, pattern)


class BagOfEmbeddings(Classifier):
    """No `get_input_embeddings()`: the embedding must be named."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(1, 1), lr=0.1)
        self.tokens = nn.Embedding(50, 4)
        self.head = nn.Linear(4, 3)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self.training_step_calls += 1
        logits = self.head(self.tokens(batch["input_ids"]).mean(1))
        return nn.functional.cross_entropy(logits, batch["labels"])


def test_no_input_embeddings_asks_for_embedding():
    pattern = r"Could not find the word embedding.*Pass `embedding=`.*found: 'tokens'"
    _fails_before_training(BagOfEmbeddings(), FGM(), RuntimeError, pattern)


@pytest.mark.parametrize("cls", METHODS, ids=_name)
@pytest.mark.parametrize("loss_fn", ["compute_los", "lr"])
def test_loss_fn_the_module_lacks(cls, loss_fn):
    pattern = (rf"{_name(cls)}: `loss_fn='{loss_fn}'`, but Classifier has no method of that "
               rf"name\. Add `def {loss_fn}\(self, batch, batch_idx\)`")
    _fails_before_training(_module(), cls(loss_fn=loss_fn), RuntimeError, pattern)


def test_two_callbacks_logging_under_one_prefix():
    # FGM and an FGM-like subclass would both log "fgm/...": one run, two meanings.
    class Custom(FGM):
        pass

    pattern = r"FGM and Custom both log under 'fgm'.*another `log_prefix=`, e.g. 'fgm_2'"
    with pytest.raises(ValueError, match=pattern):
        trainer([FGM(), Custom(log_prefix="fgm")], max_steps=1).fit(
            _module(), loader(make_batches(1)))
    # Different prefixes train.
    trainer([FGM(), FGM(epsilon=0.5, log_prefix="fgm_2")], max_steps=1).fit(
        _module(), loader(make_batches(1)))


@pytest.mark.parametrize("cls", METHODS, ids=_name)
def test_training_step_under_manual_optimization(cls):
    pattern = (rf"{_name(cls)}: under manual optimization `training_step`.*"
               r"`loss_fn='compute_loss'`")
    module = ManualClassifier(tiny_bert(), lr=0.1)
    _fails_before_training(module, cls(), RuntimeError, pattern)


class OneProcessStrategy(Strategy):
    """A single-process strategy that is none of the supported classes."""

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu")

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @property
    def is_global_zero(self) -> bool:
        return True

    def reduce(self, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        return tensor

    def barrier(self, name: str | None = None) -> None:
        return None

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather(self, tensor: Tensor, group: Any = None, sync_grads: bool = False) -> Tensor:
        return tensor


@pytest.mark.parametrize("cls", METHODS, ids=_name)
def test_unsupported_strategy(cls):
    pattern = (rf"{_name(cls)} supports single-device training and DDP.*not "
               r"OneProcessStrategy.*Use `strategy='ddp'`")
    strategy = OneProcessStrategy(accelerator=CPUAccelerator())
    _fails_before_training(_module(), cls(), NotImplementedError, pattern, strategy=strategy,
                           accelerator="auto")


@pytest.mark.parametrize("strategy", ["DeepSpeedStrategy", "XLAStrategy",
                                      "SingleDeviceXLAStrategy", "FSDPStrategy"])
def test_strategies_subclassing_supported_ones_are_refused(strategy):
    # DeepSpeed and XLA subclass DDPStrategy or SingleDeviceStrategy; an isinstance check
    # alone would let them through. Their packages are not installed here, so the check
    # runs on a bare instance.
    import types

    import lightning.pytorch.strategies as strategies

    from lightning_adv._lightning import check_strategy

    instance = object.__new__(getattr(strategies, strategy))
    with pytest.raises(NotImplementedError, match=rf"FGM supports .* not {strategy}"):
        check_strategy(types.SimpleNamespace(strategy=instance), "FGM")  # type: ignore[arg-type]


# -- at the first attacked step --------------------------------------------------------


class BadLoss(Classifier):
    """`bad_loss` returns what the test asks for instead of a loss."""

    def __init__(self, returned: Any) -> None:
        super().__init__(tiny_bert(), lr=0.1)
        self.returned = returned

    def bad_loss(self, batch: dict[str, Tensor], batch_idx: int) -> Any:
        out = self.model(**batch)
        if self.returned == "per_example":
            return nn.functional.cross_entropy(out.logits, batch["labels"], reduction="none")
        if self.returned == "logits_only":
            return {"logits": out.logits}
        if self.returned == "float_loss":
            return {"loss": float(out.loss)}
        if self.returned == "detached":
            return out.loss.detach()
        if self.returned == "number":
            return torch.tensor(float(out.loss))
        return self.returned


def _fails_at_first_attack(module: BadLoss, callback: Any, pattern: str) -> None:
    before = clone(module.model)
    batches = make_batches(2)
    with pytest.raises(RuntimeError, match=pattern):
        trainer([callback], max_steps=2).fit(module, loader(batches))
    assert module.training_step_calls == 1
    # The clean step ran, the optimizer did not step, and nothing of the attack is left:
    # every weight and the model's outputs are as before.
    for (name, value), expected in zip(module.model.state_dict().items(),
                                       before.state_dict().values(), strict=True):
        assert torch.equal(value, expected), name
    module.model.eval()
    with torch.no_grad():
        got = module.model(**batches[0]).logits
        want = before.eval()(**batches[0]).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("cls", METHODS, ids=_name)
@pytest.mark.parametrize("target", ["weight", "output"])
@pytest.mark.parametrize("returned", [None, "the loss", "logits_only", "float_loss"], ids=repr)
def test_loss_fn_returning_no_loss(cls, target, returned):
    kind = {None: "NoneType", "the loss": "str"}.get(returned, "dict")
    pattern = (rf"{_name(cls)}: `bad_loss` returned {kind} without a loss tensor\. Make it "
               r"return .*'loss'.*, or pass `loss_fn=`")
    _fails_at_first_attack(BadLoss(returned), cls(loss_fn="bad_loss", target=target), pattern)


@pytest.mark.parametrize("cls", METHODS, ids=_name)
def test_loss_fn_returning_one_loss_per_example(cls):
    # A loss per example cannot be backpropagated; the message must say which method
    # returned it and that one scalar is needed, not only what autograd complains about.
    pattern = rf"{_name(cls)}: `bad_loss`.*scalar"
    _fails_at_first_attack(BadLoss("per_example"), cls(loss_fn="bad_loss"), pattern)


@pytest.mark.parametrize("cls", METHODS, ids=_name)
@pytest.mark.parametrize("returned", ["detached", "number"])
def test_loss_fn_returning_a_loss_without_graph(cls, returned):
    pattern = (rf"{_name(cls)}: `bad_loss` returned a loss without a graph.*Return the loss "
               r"as computed")
    _fails_at_first_attack(BadLoss(returned), cls(loss_fn="bad_loss"), pattern)


class OneArgument(Classifier):
    """Lightning passes `batch_idx` only to a `training_step` with room for it."""

    def training_step(self, batch: dict[str, Tensor]) -> Tensor:  # type: ignore[override]
        return self.model(**batch).loss

    def compute_loss(self, batch: dict[str, Tensor]) -> Any:  # type: ignore[override]
        out = self.model(**batch)
        return {"loss": out.loss, "logits": out.logits}

    def three(self, batch: Any, batch_idx: int, extra: int) -> Any:
        return self.compute_loss(batch)


@pytest.mark.parametrize("loss_fn", ["training_step", "compute_loss"])
def test_loss_method_taking_only_the_batch(loss_fn):
    from lightning_adv import SMART, RobustAccuracy

    for callback in (FGM(loss_fn=loss_fn), SMART(loss_fn="compute_loss")):
        fit = trainer([callback], max_steps=1)
        fit.fit(OneArgument(tiny_bert(), lr=0.1), loader(make_batches(1)))
        assert callback.attacked_steps == 1
    robust = RobustAccuracy(epsilon=0.1, steps=1, loss_fn="compute_loss")
    trainer([robust]).validate(_ValidatedOneArgument(tiny_bert()), loader(make_batches(1)))


class _ValidatedOneArgument(OneArgument):
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.model(**batch).loss)


def test_loss_method_with_another_signature_fails_at_setup():
    pattern = (r"FGM: `OneArgument\.three\(batch, batch_idx, extra\)` cannot "
               r"be called with `\(batch, batch_idx\)` or `\(batch\)`")
    _fails_before_training(OneArgument(tiny_bert()), FGM(loss_fn="three"), TypeError, pattern)


def test_numpy_scalars_count_as_numbers():
    np = pytest.importorskip("numpy")
    fgm = FGM(epsilon=np.float32(0.5), start_step=np.int64(2), seed=np.int64(3))
    assert (fgm.epsilon, fgm.start_step, fgm.seed) == (0.5, 2, 3)
    assert (type(fgm.epsilon), type(fgm.start_step), type(fgm.seed)) == (float, int, int)


def test_an_epsilon_too_large_for_a_float_is_a_value_error():
    with pytest.raises(ValueError, match=r"FGM: `epsilon` must be a finite number >= 0"):
        FGM(epsilon=10**400)
