"""The Lightning specifics the callbacks rely on, kept in one place.

Checked against lightning 2.6. ``tests/test_lightning_contract.py`` fails when one of
these assumptions stops holding.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.strategies.single_xla import SingleDeviceXLAStrategy
from lightning.pytorch.strategies.xla import XLAStrategy
from torch import Tensor

__all__ = [
    "batch_size",
    "batch_tensor",
    "call_through_wrapper",
    "check_strategy",
    "grad_scaler",
    "loss_arity",
    "suppressed_logging",
]


def check_strategy(trainer: pl.Trainer, owner: str) -> None:
    """Raise for strategies whose parameters are sharded or managed out of our reach."""
    strategy = trainer.strategy
    # DeepSpeed and XLA subclass the supported strategies but run their own backward and
    # parameter handling, which the extra passes and the row restore have not been tested
    # against: refuse them rather than train wrongly.
    untested = (DeepSpeedStrategy, XLAStrategy, SingleDeviceXLAStrategy)
    if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(
            strategy, untested):
        return
    raise NotImplementedError(
        f"{owner} supports single-device training and DDP (`strategy='ddp'`, "
        f"`'ddp_spawn'`, `'ddp_fork'`), not {type(strategy).__name__}: sharded, "
        "offloaded or compiled-graph parameters cannot be perturbed and restored row by "
        "row. "
        "Use `strategy='ddp'`, or remove the callback."
    )


def call_through_wrapper(trainer: pl.Trainer, pl_module: pl.LightningModule, name: str,
                         *args: Any) -> Any:
    """Call ``pl_module.<name>(*args)`` through the strategy's wrapper, if it has one.

    Under DDP the forward of ``DistributedDataParallel`` arms the reducer; a pass that
    bypasses it is never all-reduced and the ranks drift apart. Lightning reroutes
    ``training_step`` through the wrapper with ``_ForwardRedirection`` (private, in
    ``lightning.pytorch.strategies.strategy`` of lightning 2.6); we use the base class, not
    the DDP subclass, because the subclass turns gradient sync off in manual optimization
    and our extra backward has no ``manual_backward`` to turn it back on.
    """
    wrapper = trainer.strategy.model
    if wrapper is None or wrapper is pl_module:
        return getattr(pl_module, name)(*args)
    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    return _ForwardRedirection()(wrapper, pl_module, name, *args)


def loss_arity(pl_module: pl.LightningModule, name: str, owner: str) -> int:
    """How many of ``(batch, batch_idx)`` the method ``name`` takes: 2, or 1 for
    ``def training_step(self, batch)``, which Lightning accepts (it passes ``batch_idx``
    only to a signature that has room for it)."""
    try:
        signature = inspect.signature(getattr(pl_module, name))
    except (TypeError, ValueError):  # no signature to read (a builtin): assume the usual
        return 2
    for count in (2, 1):
        try:
            signature.bind(*range(count))
        except TypeError:
            continue
        return count
    raise TypeError(
        f"{owner}: `{type(pl_module).__name__}.{name}({', '.join(signature.parameters)})` "
        "cannot be called with "
        f"`(batch, batch_idx)` or `(batch)`, which is how the loss method is called. Define "
        f"it as `def {name}(self, batch, batch_idx)`."
    )


def batch_tensor(batch: Any, key: str) -> Tensor | None:
    """``batch[key]`` of a mapping batch (``"attention_mask"``, ``"input_ids"`` of a Hugging
    Face batch) if it is a tensor, else ``None``."""
    value = batch.get(key) if isinstance(batch, Mapping) else None
    return value if isinstance(value, Tensor) else None


def batch_size(batch: Any) -> int | None:
    """The number of examples in ``batch`` as Lightning counts them for logging, or ``None``."""
    from lightning.pytorch.utilities.data import extract_batch_size

    try:
        return int(extract_batch_size(batch))
    except Exception:  # no tensor found: callers fall back to batch-first outputs
        return None


def grad_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The loss scaler of a ``16-mixed`` precision plugin, or ``None``."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if isinstance(scaler, torch.amp.GradScaler) else None


def _metric_states(pl_module: pl.LightningModule) -> list[tuple[Any, dict[str, Any]]]:
    from torchmetrics import Metric

    snapshots = []
    for module in pl_module.modules():
        if not isinstance(module, Metric):
            continue
        state: dict[str, Any] = {}
        for attr in [*module.metric_state, "_update_count", "_computed", "_forward_cache"]:
            value = getattr(module, attr, None)
            if isinstance(value, Tensor):
                value = value.clone()
            elif isinstance(value, list):
                value = list(value)
            state[attr] = value
        snapshots.append((module, state))
    return snapshots


@contextmanager
def suppressed_logging(pl_module: pl.LightningModule) -> Iterator[None]:
    """Run a pass whose ``self.log`` calls and torchmetrics updates leave no trace.

    ``self.log``/``self.log_dict`` are shadowed on the instance; the states of every
    torchmetrics ``Metric`` in the module are copied before and put back after.
    """
    names = ("log", "log_dict")
    saved = {key: pl_module.__dict__[key] for key in names if key in pl_module.__dict__}
    snapshots = _metric_states(pl_module)

    def _ignore(*_args: Any, **_kwargs: Any) -> None:
        return None

    object.__setattr__(pl_module, "log", _ignore)
    object.__setattr__(pl_module, "log_dict", _ignore)
    try:
        yield
    finally:
        for key in names:
            if key in saved:
                object.__setattr__(pl_module, key, saved[key])
            else:
                pl_module.__dict__.pop(key, None)
        for metric, state in snapshots:
            for attr, value in state.items():
                object.__setattr__(metric, attr, value)
