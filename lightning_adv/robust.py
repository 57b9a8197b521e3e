"""``RobustAccuracy``: accuracy under an embedding-space attack during validation and test."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torchmetrics import MeanMetric

from lightning_adv import _lightning
from lightning_adv._checks import (
    check_choice,
    check_count,
    check_name,
    check_non_negative,
    check_seed,
)
from lightning_adv.embedding import (
    EmbeddingTap,
    OutputSpace,
    find_embedding,
    modules_sharing_weight,
)
from lightning_adv.functional import l2_direction, project_l2
from lightning_adv.step import AttackStep, Forward

__all__ = ["RobustAccuracy"]

Stage = Literal["val", "test"]


class RobustAccuracy(Callback):
    """Logs accuracy under a PGD attack on the embedding output next to clean accuracy.

    During validation and test, each batch (up to ``max_batches`` per epoch) is attacked
    with ``steps`` L2 steps of size ``alpha`` inside a per-example ball of radius
    ``epsilon`` around the embedding output, from a random start, with the model in eval
    mode. An example counts as robust when it is classified correctly both clean and under
    the attack, so robust accuracy never exceeds clean accuracy. Logged at epoch end, as
    torchmetrics means synchronised across DDP ranks: ``{stage}_{name}`` and
    ``{stage}_{name}_clean`` (clean accuracy on the same batches), ``stage`` being ``val``
    or ``test``.

    Gradients are taken with respect to the perturbation only: no parameter's ``.grad``
    changes and nothing is left perturbed. Lightning's sanity check is not attacked; its
    first batch is read once, so that missing labels or a loss method without logits
    fail before training starts.

    Args:
        epsilon: radius of the ball, per example (a fraction of each example's embedding
            output norm with ``epsilon_scale="relative"``).
        alpha: step size; ``None`` gives ``2.5 * epsilon / steps`` (Madry et al., 2018).
        steps: attack steps, at least 1.
        max_batches: batches attacked per epoch and stage; ``None`` for all.
        loss_fn: LightningModule method called as ``loss_fn(batch, batch_idx)`` (or
            ``loss_fn(batch)`` if that is all it takes) that returns logits (a dict with
            ``"logits"`` or an object with ``.logits``).
        label_key: key of the labels in a mapping batch (or index in a sequence batch).
        epsilon_scale: ``"absolute"`` or ``"relative"``, as for the training callbacks.
        embedding: as for the training callbacks.
        name: metric name suffix; use different names for several instances.
        seed: seed of the random start.

    Example::

        trainer = Trainer(callbacks=[FGM(epsilon=0.02, epsilon_scale="relative"),
                                     RobustAccuracy(epsilon=0.1, epsilon_scale="relative")])
    """

    def __init__(
        self,
        epsilon: float = 1.0,
        alpha: float | None = None,
        steps: int = 10,
        max_batches: int | None = None,
        loss_fn: str = "compute_loss",
        label_key: str | int = "labels",
        epsilon_scale: Literal["absolute", "relative"] = "absolute",
        embedding: str | None = None,
        name: str = "robust_acc",
        seed: int = 0,
    ) -> None:
        owner = "RobustAccuracy"
        self.epsilon = check_non_negative(owner, "epsilon", epsilon, "1.0")
        self.steps = check_count(owner, "steps", steps, 1)
        self.alpha = (
            2.5 * self.epsilon / self.steps
            if alpha is None
            else check_non_negative(owner, "alpha", alpha, "0.25")
        )
        self.max_batches = None if max_batches is None else check_count(
            owner, "max_batches", max_batches, 1
        )
        if not isinstance(loss_fn, str) or not loss_fn.isidentifier():
            raise TypeError(f"{owner}: `loss_fn` must be a method name, got {loss_fn!r}.")
        self.loss_fn = loss_fn
        self.label_key = label_key
        self.epsilon_scale = check_choice(
            owner, "epsilon_scale", epsilon_scale, ("absolute", "relative")
        )
        self.embedding = embedding
        self.name = check_name(owner, "name", name)
        checked = check_seed(owner, seed)
        if checked is None:
            raise TypeError(f"{owner}: `seed` must be a whole number, got None.")
        self.seed = checked
        self._tap: EmbeddingTap | None = None
        self._loss_arity = 2
        self._measured = 0
        self._metrics: dict[str, MeanMetric] = {}
        self._batches: dict[str, int] = {}
        self._generator: torch.Generator | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name, epsilon=self.epsilon)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, self.loss_fn, None)):
            raise RuntimeError(
                f"RobustAccuracy: `loss_fn={self.loss_fn!r}`, but "
                f"{type(pl_module).__name__} has no method of that name. Add "
                f"`def {self.loss_fn}(self, batch, batch_idx)` returning a dict with "
                "'logits', or pass the name of a method that does."
            )
        self._loss_arity = _lightning.loss_arity(pl_module, self.loss_fn, "RobustAccuracy")
        if self._tap is None:
            name, embedding = find_embedding(pl_module, self.embedding)
            self._tap = EmbeddingTap(name, modules_sharing_weight(pl_module, embedding))
            self._tap.attach()
        self._generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        for key in ("val", "val_clean", "test", "test_clean"):
            self._metrics[key] = MeanMetric().to(pl_module.device)
        self._measured = 0

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._tap is not None:
            self._tap.detach()
            self._tap = None
            interrupted = trainer.state.status == TrainerStatus.INTERRUPTED
            if self._measured == 0 and stage in ("fit", "validate", "test") and not interrupted:
                rank_zero_warn(
                    f"RobustAccuracy measured nothing during {getattr(stage, 'value', stage)}: "
                    "it attacks validation "
                    "and test batches, and this run had none (no `val_dataloader` or "
                    "`validation_step`, `limit_val_batches=0`, or training ended before "
                    "the first validation). Give the run a validation loop, or call "
                    "`trainer.validate` / `trainer.test`.",
                    category=UserWarning,
                )

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        # Lightning skips `teardown` after an exception; the hook must not outlive the run.
        self.teardown(trainer, pl_module, str(trainer.state.stage or "validate"))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule
                                  ) -> None:
        self._batches["val"] = 0

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches["test"] = 0

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._attack_batch(trainer, pl_module, batch, batch_idx, "val")
        elif batch_idx == 0:
            self._check_batch(trainer, pl_module, batch, batch_idx)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                          outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        self._attack_batch(trainer, pl_module, batch, batch_idx, "test")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule
                                ) -> None:
        if not trainer.sanity_checking:
            self._log(pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(pl_module, "test")

    # -- helpers ----------------------------------------------------------------------

    def _attack_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                      batch_idx: int, stage: Stage) -> None:
        seen = self._batches.get(stage, 0)
        if self.max_batches is not None and seen >= self.max_batches:
            return
        self._batches[stage] = seen + 1
        self._measured += 1
        was_training = pl_module.training
        pl_module.eval()
        # Validation runs in inference mode, whose tensors cannot enter a graph: clone.
        with torch.inference_mode(False), torch.enable_grad():
            batch = apply_to_collection(batch, Tensor, lambda t: t.clone())
            try:
                robust, clean = self._attack(trainer, pl_module, batch, batch_idx)
            finally:
                pl_module.train(was_training)
        self._metrics[stage].update(robust)
        self._metrics[f"{stage}_clean"].update(clean)

    def _check_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                     batch_idx: int) -> None:
        """During the sanity check, find a batch without labels or a loss method without
        logits before training starts, rather than at the first validation."""
        labels = self._labels(batch)
        with torch.no_grad():
            logits = Forward(self._loss_runner(trainer, pl_module, batch, batch_idx)(), [],
                             self.loss_fn, "RobustAccuracy").logits
        if labels.shape != logits.shape[:-1] or labels.is_floating_point():
            raise RuntimeError(
                f"RobustAccuracy: `{self.loss_fn}` returned logits of shape "
                f"{tuple(logits.shape)}, so the labels must be {tuple(logits.shape[:-1])} "
                f"class ids, but `batch[{self.label_key!r}]` is {labels.dtype} of shape "
                f"{tuple(labels.shape)}. Pass `label_key=` naming the class ids."
            )

    def _loss_runner(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                     batch_idx: int) -> Callable[[], Any]:
        def run_loss() -> Any:
            with trainer.precision_plugin.val_step_context(), _lightning.suppressed_logging(
                pl_module
            ):
                return getattr(pl_module, self.loss_fn)(*(batch, batch_idx)[:self._loss_arity])

        return run_loss

    def _attack(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                batch_idx: int) -> tuple[Tensor, Tensor]:
        assert self._tap is not None
        labels = self._labels(batch)
        run_loss = self._loss_runner(trainer, pl_module, batch, batch_idx)

        with torch.no_grad(), self._tap.pass_with(None, without_grad=True) as calls:
            clean_logits = Forward(run_loss(), [], self.loss_fn, "RobustAccuracy").logits
        space = OutputSpace(self._tap, calls, _lightning.batch_size(batch),
                            _lightning.batch_tensor(batch, "attention_mask"),
                            _lightning.batch_tensor(batch, "input_ids"))
        step = AttackStep(
            space=space, calls=calls, run_loss=run_loss, backward=_no_backward,
            scale=lambda value: value, replay=None,
            loss_fn=self.loss_fn, epsilon_scale=self.epsilon_scale, generator=self._generator,
            owner="RobustAccuracy",
        )
        radius, alpha = step.l2_budget(self.epsilon), step.l2_budget(self.alpha)
        delta = project_l2(step.mask(step.uniform()), radius)
        for _ in range(self.steps):
            with step.forward_at(delta) as forward:
                loss = F.cross_entropy(forward.logits.float(), labels)
                gradient = step.perturbation_gradient(loss, forward)
            delta = step.mask(project_l2(delta + alpha * l2_direction(gradient), radius))
        with torch.no_grad(), step.forward_at(delta) as forward:
            adversarial_logits = forward.logits

        clean = clean_logits.argmax(dim=-1) == labels
        robust = clean & (adversarial_logits.argmax(dim=-1) == labels)
        return robust.float(), clean.float()

    def _labels(self, batch: Any) -> Tensor:
        try:
            labels = batch[self.label_key]
        except (KeyError, IndexError, TypeError):
            keys = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise RuntimeError(
                f"RobustAccuracy: the batch has no labels under `label_key="
                f"{self.label_key!r}` (got {keys}). Pass `label_key=` naming them."
            ) from None
        if not isinstance(labels, Tensor):
            raise RuntimeError(
                f"RobustAccuracy: `batch[{self.label_key!r}]` is a "
                f"{type(labels).__name__}, not a tensor of class ids."
            )
        return labels

    def _log(self, pl_module: pl.LightningModule, stage: Stage) -> None:
        robust, clean = self._metrics[stage], self._metrics[f"{stage}_clean"]
        if robust.update_count == 0:
            return
        # compute() already synchronises the metric over DDP ranks: every rank logs the same.
        pl_module.log(f"{stage}_{self.name}", robust.compute(), sync_dist=True)
        pl_module.log(f"{stage}_{self.name}_clean", clean.compute(), sync_dist=True)
        robust.reset()
        clean.reset()


def _no_backward(value: Tensor) -> None:
    raise RuntimeError("RobustAccuracy never backpropagates into parameters.")
