"""``AdversarialCallback``: the Lightning plumbing shared by every method."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_adv import _lightning
from lightning_adv._checks import (
    check_choice,
    check_count,
    check_flag,
    check_name,
    check_non_negative,
    check_seed,
)
from lightning_adv._state import CleanGradientWeight, RandomState
from lightning_adv.embedding import (
    EmbeddingCall,
    EmbeddingTap,
    OutputSpace,
    WeightRowSpace,
    find_embedding,
    modules_sharing_weight,
)
from lightning_adv.monitor import (
    OUTPUT_LARGEST_LIMIT,
    OUTPUT_MEAN_LIMIT,
    WEIGHT_LARGEST_LIMIT,
    WEIGHT_MEAN_LIMIT,
    CollapseMonitor,
)
from lightning_adv.step import AttackStep, parse_loss_output

__all__ = ["AdversarialCallback"]

Target = Literal["weight", "output"]
EpsilonScale = Literal["absolute", "relative"]


class AdversarialCallback(Callback):
    """Base class of the adversarial training callbacks.

    After the clean backward of an attacked step (``on_after_backward``), it hands the
    method an :class:`~lightning_adv.step.AttackStep` holding this micro-batch's gradient
    with respect to the embedding; the method runs its extra passes through it, and the
    embedding is restored before the optimizer steps on clean plus adversarial gradients.
    A subclass implements :meth:`attack` only.

    Args:
        target: ``"weight"`` perturbs the embedding rows the batch touches (one norm over
            all of them); ``"output"`` adds the perturbation to the embedding output, one
            norm per example, padding kept at zero.
        embedding: ``None`` to use ``get_input_embeddings()``; else a dotted module path in
            the LightningModule, or a name suffix matching exactly one ``nn.Embedding``.
        loss_fn: name of the LightningModule method giving the loss of a batch, called as
            ``loss_fn(batch, batch_idx)``, or ``loss_fn(batch)`` if that is all it takes;
            returns a tensor, a dict with ``"loss"``, or an
            object with ``.loss``. Use a side-effect-free method under manual optimization.
        adv_weight: the adversarial loss is multiplied by it.
        start_step: first attacked optimizer step (``trainer.global_step``, 0-based).
        every_n_steps: after ``start_step``, attack every n-th optimizer step.
        replay_dropout: replay the clean pass's random state in every adversarial pass, so
            dropout masks match; the random stream afterwards is left as the clean pass
            left it.
        epsilon_scale: ``"absolute"`` reads ``epsilon`` (and ``alpha``, radii) as norms;
            ``"relative"`` as fractions of what is perturbed: each example's embedding
            output, or the touched rows of the weight (for sign steps: of the
            root-mean-square entry). A relative budget means the same on every model.
        warn_on_collapse: warn once when the logged statistics show the run heading for a
            collapse to one class (see :class:`~lightning_adv.monitor.CollapseMonitor`).
        seed: seed of the callback's own random generator (random starts, noise); by
            default derived from ``torch.initial_seed()``, so ``seed_everything`` fixes it.
            The global random stream is never drawn from.
        log_prefix: prefix of the logged keys; the class name in lower case by default.

    Raises:
        ValueError, TypeError: at construction, for a bad argument.
        RuntimeError, NotImplementedError: at ``setup``, for an embedding or loss method
            that cannot be found, ``loss_fn="training_step"`` under manual optimization,
            or an unsupported strategy.
        ValueError, TypeError: at ``setup``, for a ``log_prefix`` another callback already
            uses, or a loss method that takes neither ``(batch, batch_idx)`` nor
            ``(batch)``.
    """

    #: Names of the subclass arguments that identify an instance in a checkpoint.
    identity: ClassVar[tuple[str, ...]] = ()
    #: Targets the method supports.
    targets: ClassVar[tuple[str, ...]] = ("weight", "output")
    #: Whether the method perturbs the word embedding (AWP perturbs other weights).
    needs_embedding: ClassVar[bool] = True
    #: The argument that sizes the perturbation, named in collapse warnings.
    size_argument: ClassVar[str] = "epsilon"

    def __init__(
        self,
        *,
        target: Target = "weight",
        embedding: str | None = None,
        loss_fn: str = "training_step",
        adv_weight: float = 1.0,
        start_step: int = 0,
        every_n_steps: int = 1,
        replay_dropout: bool = True,
        epsilon_scale: EpsilonScale = "absolute",
        warn_on_collapse: bool = True,
        seed: int | None = None,
        log_prefix: str | None = None,
    ) -> None:
        owner = type(self).__name__
        self.target: Target = check_choice(owner, "target", target, self.targets)  # type: ignore[assignment]
        if embedding is not None and (not isinstance(embedding, str) or not embedding):
            raise TypeError(
                f"{owner}: `embedding` must be None or a module name such as "
                f"'word_embeddings', got {embedding!r}."
            )
        if not isinstance(loss_fn, str) or not loss_fn.isidentifier():
            raise TypeError(
                f"{owner}: `loss_fn` must be the name of a LightningModule method such as "
                f"'training_step' or 'compute_loss', got {loss_fn!r}."
            )
        self.embedding = embedding
        self.loss_fn = loss_fn
        self.adv_weight = check_non_negative(owner, "adv_weight", adv_weight, "1.0")
        if self.adv_weight == 0:
            warnings.warn(
                f"{owner}: adv_weight=0 keeps the adversarial passes, and their cost, but "
                "adds nothing to the gradients the optimizer steps on. To train without the "
                "attack remove the callback; to measure robustness use RobustAccuracy.",
                UserWarning, stacklevel=3,
            )
        self.start_step = check_count(owner, "start_step", start_step, 0)
        self.every_n_steps = check_count(owner, "every_n_steps", every_n_steps, 1)
        self.replay_dropout = check_flag(owner, "replay_dropout", replay_dropout)
        self.epsilon_scale: EpsilonScale = check_choice(  # type: ignore[assignment]
            owner, "epsilon_scale", epsilon_scale, ("absolute", "relative")
        )
        self.warn_on_collapse = check_flag(owner, "warn_on_collapse", warn_on_collapse)
        self.seed = check_seed(owner, seed)
        self.log_prefix = owner.lower() if log_prefix is None else check_name(
            owner, "log_prefix", log_prefix)
        #: Weight of this micro-batch's clean gradient in ``.grad`` (FreeLB exposes it).
        self.clean_weight = 1.0

        self.attacked_steps = 0
        self._last_counted_step = -1
        self._step_of_batch = 0
        # Keys an attacked step logged besides `attacked`; see `_log_skipped`.
        self._attack_keys: set[str] = set()
        self.generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None
        self._tap: EmbeddingTap | None = None
        self._monitor: CollapseMonitor | None = None
        self._unwrap_loss_fn: Any = None
        self._loss_arity = 2  # (batch, batch_idx); set from the method's signature in setup
        self._reset_step()

    def _reset_step(self) -> None:
        self._scheduled = False
        self._attacked_this_batch = False
        self._busy = False
        self._batch: Any = None
        self._batch_idx = 0
        self._rng_state: RandomState | None = None
        self._clean_logits: Tensor | None = None
        self._clean_loss: Tensor | None = None
        self._clean_loss_seen: Tensor | None = None
        self._adv_loss_seen: Tensor | None = None
        self._clean_weighting: CleanGradientWeight | None = None

    def attack(self, step: AttackStep) -> None:
        """Build the perturbation from ``step.clean_gradient`` and run the extra passes."""
        raise NotImplementedError(f"{type(self).__name__} must implement `attack(step)`.")

    def attack_batch(self, batch: Any) -> Any:
        """The batch the loss method is called on in the adversarial passes.

        The training batch by default; VAT returns the unlabelled part of a combined batch.
        When this returns another object, the step is built from a forward on it without
        gradient, and ``step.clean_gradient`` is zero.
        """
        return batch

    @property
    def in_clean_pass(self) -> bool:
        """True between the start of an attacked batch and its clean backward's end."""
        return self._scheduled and not self._busy

    @property
    def state_key(self) -> str:
        # Every argument that changes what an instance does or counts, so that two
        # instances differing in any of them can run side by side with separate states.
        fields = {name: getattr(self, name) for name in self.identity}
        return self._generate_state_key(
            target=self.target, embedding=self.embedding, loss_fn=self.loss_fn,
            adv_weight=self.adv_weight, start_step=self.start_step,
            every_n_steps=self.every_n_steps, epsilon_scale=self.epsilon_scale, **fields
        )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"attacked_steps": self.attacked_steps}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.attacked_steps = int(state_dict.get("attacked_steps", 0))
        self._generator_state = state_dict.get("generator")
        if self.generator is not None and self._generator_state is not None:
            self.generator.set_state(self._generator_state)

    def __repr__(self) -> str:
        embedding = ["target", "epsilon_scale"] if self.needs_embedding else []
        names = [*self.identity, *embedding, "adv_weight", "start_step", "every_n_steps"]
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in dict.fromkeys(names)
                           if hasattr(self, name))
        return f"{type(self).__name__}({fields})"

    def is_attack_step(self, global_step: int) -> bool:
        """Whether the optimizer step ``global_step`` is attacked by the schedule."""
        offset = global_step - self.start_step
        return offset >= 0 and offset % self.every_n_steps == 0

    # -- Lightning hooks --------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        owner = type(self).__name__
        _lightning.check_strategy(trainer, owner)
        # Steps are numbered anew by each fit: a step counted in an earlier fit of this
        # callback must not stop the same number from counting again.
        self._last_counted_step = -1
        self._check_log_prefix(trainer)
        self._check_loss_fn(pl_module)
        if self.needs_embedding:
            name, embedding = find_embedding(pl_module, self.embedding)
            self._tap = EmbeddingTap(name, modules_sharing_weight(pl_module, embedding))
            self._tap.attach()
        self._wrap_loss_fn(pl_module)
        self._make_generator(pl_module.device)
        size = getattr(self, self.size_argument, None)
        self._monitor = CollapseMonitor(
            owner, size if isinstance(size, float) else None, self.size_argument,
            self.epsilon_scale == "relative" or not self.needs_embedding,
            mean_limit=OUTPUT_MEAN_LIMIT if self.target == "output" else WEIGHT_MEAN_LIMIT,
            largest_limit=(OUTPUT_LARGEST_LIMIT if self.target == "output"
                           else WEIGHT_LARGEST_LIMIT),
        )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._tap is not None:
            self._tap.detach()
            self._tap = None
        if self._unwrap_loss_fn is not None:
            self._unwrap_loss_fn()
            self._unwrap_loss_fn = None
        self._end_batch()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        # Lightning skips `teardown` after an exception: without this, a failed fit would
        # leave the hooks on the module and its loss method wrapped, one more per retry.
        self.teardown(trainer, pl_module, str(trainer.state.stage or "fit"))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        if math.isfinite(total) and total > 0 and self.start_step >= total:
            rank_zero_warn(
                f"{type(self).__name__}: start_step={self.start_step}, but this fit runs "
                f"{int(total)} optimizer steps, so no step will be attacked. Lower "
                "`start_step` or train for longer.",
                category=UserWarning,
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._reset_step()
        self._scheduled = self.is_attack_step(trainer.global_step)
        self._step_of_batch = trainer.global_step
        if not self._scheduled:
            return
        self._batch, self._batch_idx = batch, batch_idx
        if self.replay_dropout:
            self._rng_state = RandomState.capture(pl_module.device)
        if self._tap is not None:
            self._tap.record(capture_grads=True)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: Tensor) -> None:
        if not self.in_clean_pass:
            return
        if self._tap is not None:
            # The clean forward is over: another callback's adversarial passes must not
            # add their calls to this one's.
            self._tap.pause()
        self._clean_loss_seen = loss.detach()
        if self.clean_weight != 1.0:
            self._clean_weighting = CleanGradientWeight(self.clean_weight)
            self._clean_weighting.before_backward(pl_module)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._busy:
            return
        if not self._scheduled:
            self._log_skipped(pl_module)
            return
        calls = self._tap.take_calls() if self._tap is not None else []
        if self._attacked_this_batch and (self._tap is None or not calls):
            return  # a further backward of a manual step, with no new forward
        if self._tap is not None and not calls and self.attack_batch(self._batch) is self._batch:
            raise RuntimeError(
                f"{type(self).__name__}: the embedding {self._tap.name!r} was not called in "
                f"the forward pass of this training step, so it cannot be attacked. Pass "
                f"`embedding=` with the embedding module that `{self.loss_fn}` really calls."
            )
        if self._tap is not None and calls and all(call.grad is None for call in calls):
            raise RuntimeError(
                f"{type(self).__name__}: the loss of this training step did not reach the "
                f"output of the embedding {self._tap.name!r} through "
                "autograd (it was detached, or computed under `torch.no_grad()`), so any "
                "perturbation of it would change nothing. Let the loss depend on the "
                "embedding's output, or pass `embedding=` with the one it does depend on."
            )
        if self._clean_weighting is not None:
            self._clean_weighting.after_backward()
            self._clean_weighting = None

        self._busy = True
        try:
            step = self._attack_step(trainer, pl_module, calls)
            del calls  # the step keeps what it needs of the clean pass; free the rest
            self.attack(step)
        finally:
            self._busy = False
            if self._tap is not None and not pl_module.automatic_optimization:
                self._tap.record(capture_grads=True)  # a manual step may run more forwards
        self._attacked_this_batch = True
        self._log_attack(trainer, pl_module, step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        # Counted in optimizer steps: the micro-batches of one accumulation window count once.
        if self._attacked_this_batch and self._last_counted_step != self._step_of_batch:
            self.attacked_steps += 1
            self._last_counted_step = self._step_of_batch
        self._end_batch()

    # -- helpers ----------------------------------------------------------------------

    def _check_log_prefix(self, trainer: pl.Trainer) -> None:
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if (other is not self and isinstance(other, AdversarialCallback)
                    and other.log_prefix == self.log_prefix):
                raise ValueError(
                    f"{type(self).__name__} and {type(other).__name__} both log under "
                    f"{self.log_prefix!r}, so their metrics would overwrite each other. Give "
                    f"one of them another `log_prefix=`, e.g. '{self.log_prefix}_2'."
                )

    def _check_loss_fn(self, pl_module: pl.LightningModule) -> None:
        owner = type(self).__name__
        if not pl_module.automatic_optimization and self.loss_fn == "training_step":
            raise RuntimeError(
                f"{owner}: under manual optimization `training_step` steps the optimizer "
                "itself and cannot be re-run for the adversarial pass. Give the module a "
                "side-effect-free method returning the loss of a batch, e.g. "
                "`def compute_loss(self, batch, batch_idx)`, and pass "
                "`loss_fn='compute_loss'`."
            )
        if not callable(getattr(pl_module, self.loss_fn, None)):
            raise RuntimeError(
                f"{owner}: `loss_fn={self.loss_fn!r}`, but {type(pl_module).__name__} has no "
                f"method of that name. Add `def {self.loss_fn}(self, batch, batch_idx)` "
                "returning the loss, or pass the name of an existing method."
            )
        self._loss_arity = _lightning.loss_arity(pl_module, self.loss_fn, owner)

    def _wrap_loss_fn(self, pl_module: pl.LightningModule) -> None:
        """Keep the loss and logits the loss method returns during the clean pass, for free:
        the logits for the methods that compare with them, the loss for the logged ratio."""
        original = getattr(pl_module, self.loss_fn)
        shadowed = self.loss_fn in pl_module.__dict__

        @functools.wraps(original)
        def recording(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            if self.in_clean_pass:
                loss, logits = parse_loss_output(output)
                if logits is not None:
                    self._clean_logits = logits.detach()
                if loss is not None and loss.numel() == 1:
                    self._clean_loss = loss.detach()
            return output

        object.__setattr__(pl_module, self.loss_fn, recording)

        def unwrap() -> None:
            if shadowed:
                object.__setattr__(pl_module, self.loss_fn, original)
            else:
                pl_module.__dict__.pop(self.loss_fn, None)

        self._unwrap_loss_fn = unwrap

    def _make_generator(self, device: torch.device) -> None:
        self.generator = torch.Generator(device=device)
        seed = self.seed if self.seed is not None else torch.initial_seed() % 2**63
        self.generator.manual_seed(seed)
        if self._generator_state is not None:
            self.generator.set_state(self._generator_state)

    def _attack_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     calls: list[EmbeddingCall]) -> AttackStep:
        clean_logits = self._clean_logits
        batch = self.attack_batch(self._batch)
        if batch is not self._batch:
            calls, clean_logits = self._reference_pass(trainer, pl_module, batch)
            self._batch = batch
        space: OutputSpace | WeightRowSpace | None = None
        if self._tap is not None:
            if self.target == "weight":
                space = WeightRowSpace(self._tap, calls)
            else:
                space = OutputSpace(self._tap, calls, _lightning.batch_size(batch),
                                    _lightning.batch_tensor(batch, "attention_mask"),
                                    _lightning.batch_tensor(batch, "input_ids"))
        scaler = _lightning.grad_scaler(trainer)
        return AttackStep(
            space=space,
            calls=calls,
            run_loss=lambda: self._run_loss(trainer, pl_module),
            backward=lambda value: self._backward(trainer, pl_module, value),
            scale=scaler.scale if scaler is not None else _identity,
            replay=self._replayed_rng if self.replay_dropout else None,
            loss_fn=self.loss_fn,
            epsilon_scale=self.epsilon_scale,
            clean_logits=clean_logits,
            generator=self.generator,
            owner=type(self).__name__,
        )

    def _reference_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                        batch: Any) -> tuple[list[EmbeddingCall], Tensor | None]:
        """A forward without gradient on ``batch``: its embedding calls and its logits."""
        assert self._tap is not None
        saved, self._batch = self._batch, batch
        try:
            with torch.no_grad(), self._tap.pass_with(None, without_grad=True) as calls, \
                    self._replayed_rng():
                output = self._run_loss(trainer, pl_module)
        finally:
            self._batch = saved
        if not calls:
            raise RuntimeError(
                f"{type(self).__name__}: the embedding {self._tap.name!r} was not called when "
                f"`{self.loss_fn}` ran on the attacked part of the batch. Pass `embedding=` "
                "with the embedding module that it really calls."
            )
        _, logits = parse_loss_output(output)
        return calls, None if logits is None else logits.detach()

    def _run_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        with trainer.precision_plugin.train_step_context(), _lightning.suppressed_logging(
            pl_module
        ):
            arguments = (self._batch, self._batch_idx)[:self._loss_arity]
            return _lightning.call_through_wrapper(trainer, pl_module, self.loss_fn, *arguments)

    def _backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                  value: Tensor) -> None:
        # Scaled as Lightning scales the clean loss: divided over accumulated micro-batches
        # (automatic optimization only), then by the AMP loss scale. A direct backward
        # fires no Lightning hook, so nothing runs twice and nothing recurses.
        loss = value
        if pl_module.automatic_optimization:
            loss = loss / trainer.accumulate_grad_batches
        scaler = _lightning.grad_scaler(trainer)
        if scaler is not None:
            loss = scaler.scale(loss)
        # Transformed like the loss `on_before_backward` saw, for the adversarial/clean ratio.
        seen = loss.detach()
        self._adv_loss_seen = seen if self._adv_loss_seen is None else self._adv_loss_seen + seen
        (loss * self.adv_weight).backward()  # type: ignore[no-untyped-call]

    @contextmanager
    def _replayed_rng(self) -> Iterator[None]:
        if self._rng_state is None:
            yield
        else:
            with self._rng_state.replayed():
                yield

    def _log_attack(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                    step: AttackStep) -> None:
        prefix = self.log_prefix
        values: dict[str, Any] = {f"{prefix}/attacked": 1.0}
        if step.adversarial_loss is not None:
            values[f"{prefix}/adv_loss"] = step.adversarial_loss.float()
        sizes = step.size_logs(step.perturbation) if step.perturbation is not None else {}
        sizes.update(step.logs)
        for name, value in sizes.items():
            values[f"{prefix}/{name}"] = value
        clean_loss = ratio = None
        if self._clean_loss is not None and step.adversarial_loss is not None:
            # Both as the loss method returned them: whatever the module divides its loss
            # by before `manual_backward` (its own accumulation) does not enter the ratio.
            clean_loss = self._clean_loss.float()
            ratio = step.adversarial_loss.float() / clean_loss
        elif self._clean_loss_seen is not None and self._adv_loss_seen is not None:
            # The loss method did not run in the clean pass (`training_step` computed the
            # loss itself): compare the losses as backpropagated, scaled alike.
            ratio = (self._adv_loss_seen / self._clean_loss_seen).float()
            if step.adversarial_loss is not None:
                clean_loss = step.adversarial_loss.float() / ratio
        if ratio is not None:
            values[f"{prefix}/adv_clean_ratio"] = ratio
        pl_module.log_dict(values, on_step=True, on_epoch=False)
        self._attack_keys.update(key for key in values if key != f"{prefix}/attacked")

        if self.warn_on_collapse and self._monitor is not None:
            self._monitor.update(sizes.get("rel_size_max"), clean_loss, step.classes,
                                 sizes.get("rel_size_mean"))
            every = int(getattr(trainer, "log_every_n_steps", 50))
            if self.attacked_steps % max(every, 1) == 0:
                self._monitor.check()

    def _log_skipped(self, pl_module: pl.LightningModule) -> None:
        # Lightning reports an on-step value again at every later step of the epoch until it
        # is logged anew: a skipped step would show the last attacked step's values. NaN
        # marks "no value".
        values: dict[str, Any] = dict.fromkeys(sorted(self._attack_keys), math.nan)
        values[f"{self.log_prefix}/attacked"] = 0.0
        pl_module.log_dict(values, on_step=True, on_epoch=False)

    def _end_batch(self) -> None:
        if self._tap is not None:
            self._tap.stop()
        self._reset_step()


def _identity(value: Tensor) -> Tensor:
    return value
