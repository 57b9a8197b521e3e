"""Contract: under DDP the adversarial pass is all-reduced like the clean one.

Every distributed run uses 2 ranks over gloo on CPU, bound to loopback. The ranks are forked
(``ddp_fork``) from a process of their own process group, which is killed if the run outlives
``TIMEOUT`` (and gloo gives up on a collective after half of it): a rank that skips a
collective leaves the other waiting, and the test fails instead of hanging.

With the output target, dropout off and equal per-rank batches, rank 0 on batches A and
rank 1 on batches B train exactly like one process on A and B concatenated: each example's
perturbation depends on its own gradient only, and DDP's average of the two ranks' gradients
is the gradient of the mean loss over A + B.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor

from lightning_adv import (
    AWP,
    FGM,
    FGSM,
    PGD,
    R3F,
    SMART,
    VAT,
    AdversarialCallback,
    AttackStep,
    FreeLB,
    _lightning,
)
from lightning_adv.functional import row_norms
from tests.helpers import (
    Classifier,
    ManualClassifier,
    attack_and_capture,
    loader,
    make_batches,
    tiny_bert,
)
from tests.helpers import trainer as make_trainer

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork")
    or not torch.distributed.is_available()
    or not torch.distributed.is_gloo_available(),
    reason="needs fork and the gloo backend",
)

STEPS = 3
TIMEOUT = 120.0
METHODS = {
    "fgm": (FGM, {"epsilon": 1.0}),
    "fgsm": (FGSM, {"epsilon": 0.05}),
    "pgd": (PGD, {"epsilon": 1.0, "alpha": 0.4, "steps": 3}),
}
# Calls of `training_step` per attacked step: the clean pass plus the method's extra ones.
PASSES = {"fgm": 2, "fgsm": 2, "pgd": 4}

Batch = dict[str, Tensor]
Record = dict[str, Any]


# -- data: rank r reads parts[r] ------------------------------------------------------------


def _rank_parts(n: int) -> list[list[Batch]]:
    """Different batches of equal size for rank 0 and rank 1."""
    return [make_batches(n, seed=1), make_batches(n, seed=2)]


def _concatenated(parts: list[list[Batch]]) -> list[list[Batch]]:
    """One part whose k-th batch joins the k-th batches of every rank."""
    joined = [{key: torch.cat([b[key] for b in group]) for key in group[0]} for group in
              zip(*parts, strict=True)]
    return [joined]


class _PerRankData(pl.LightningDataModule):
    def __init__(self, parts: list[list[Batch]]) -> None:
        super().__init__()
        self.parts = parts

    def train_dataloader(self) -> Any:
        return loader(self.parts[self.trainer.global_rank])


# -- what each rank reports ------------------------------------------------------------------


class _SaveRank(pl.Callback):
    """Writes each rank's parameters, ``training_step`` calls and perturbation norms."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        attack = next(c for c in trainer.callbacks if isinstance(c, AdversarialCallback))
        torch.save({
            "params": {name: p.detach().clone() for name, p in pl_module.named_parameters()},
            "training_step_calls": pl_module.training_step_calls,
            "norms": getattr(attack, "perturbation_norms", []),
        }, self.out / f"rank{trainer.global_rank}.pt")


def _recording(cls: type[AdversarialCallback]) -> type[AdversarialCallback]:
    """``cls`` keeping the per-example norm of every perturbation it applied."""

    class Recording(cls):  # type: ignore[valid-type,misc]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.perturbation_norms: list[Tensor] = []

        def attack(self, step: AttackStep) -> None:
            r = attack_and_capture(super().attack, step)
            assert r is not None
            self.perturbation_norms.append(row_norms(r).flatten())

    return Recording


# -- running ------------------------------------------------------------------------------------


def _fit(module: Classifier, callback: AdversarialCallback, parts: list[list[Batch]],
         out: Path, **trainer_kwargs: Any) -> list[Record]:
    """Fit on ``len(parts)`` ranks (DDP when 2) and return each rank's record."""
    out.mkdir(parents=True, exist_ok=True)
    devices = len(parts)
    strategy: Any = "auto"
    if devices > 1:
        strategy = DDPStrategy(start_method="fork", process_group_backend="gloo",
                               timeout=timedelta(seconds=TIMEOUT / 2))
    options: dict[str, Any] = dict(max_steps=STEPS, use_distributed_sampler=False)
    options.update(trainer_kwargs)
    trainer = make_trainer([callback, _SaveRank(out)], devices=devices, strategy=strategy,
                           default_root_dir=out, **options)

    def job() -> None:
        trainer.fit(module, datamodule=_PerRankData(parts))

    if devices == 1:
        job()
    else:
        _run_in_own_group(job, out)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(devices)]


def _run_in_own_group(job: Callable[[], None], out: Path) -> None:
    process = multiprocessing.get_context("fork").Process(target=_isolated, args=(job, out))
    process.start()
    process.join(TIMEOUT)
    if process.is_alive():
        os.killpg(process.pid, signal.SIGKILL)
        process.join()
        pytest.fail(f"the 2-rank fit did not finish within {TIMEOUT:.0f} s: a rank hung")
    if process.exitcode != 0:
        error = out / "error.txt"
        pytest.fail(error.read_text() if error.exists() else f"exit code {process.exitcode}")


def _isolated(job: Callable[[], None], out: Path) -> None:
    # A process group of its own, so that the ranks forked below can be killed together.
    os.setpgrp()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    loopback = next(name for _, name in socket.if_nameindex() if name.startswith("lo"))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      GLOO_SOCKET_IFNAME=loopback)
    tempfile.tempdir = str(out)  # Lightning hands rank 0's weights back through a temp file
    try:
        job()
    except BaseException:
        (out / "error.txt").write_text(traceback.format_exc())
        raise


def _max_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def _assert_ranks_identical(ranks: list[Record]) -> None:
    first, second = (rank["params"] for rank in ranks)
    for name, value in first.items():
        difference = (value - second[name]).abs().max().item()
        assert difference == 0, f"{name} differs between the ranks by {difference:.3g}"


def _initial_params(model: torch.nn.Module) -> dict[str, Tensor]:
    return {"model." + name: p.detach().clone() for name, p in model.named_parameters()}


def _train(parts: list[list[Batch]], out: Path, *, method: str = "fgm", target: str = "output",
           optimizer: str = "sgd", manual: bool = False, accumulate: int = 1) -> list[Record]:
    cls, args = METHODS[method]
    lr = 0.1 if optimizer == "sgd" else 0.01
    if manual:
        module: Classifier = ManualClassifier(tiny_bert(), lr=lr)
        callback = cls(target=target, loss_fn="compute_loss", **args)
    else:
        module = Classifier(tiny_bert(), lr=lr, optimizer=optimizer)
        callback = cls(target=target, **args)
    return _fit(module, callback, parts, out, accumulate_grad_batches=accumulate)


def _ddp_and_single(tmp_path: Path, **setup: Any) -> tuple[list[Record], Record]:
    """The records of both ranks of a DDP run and of one process on the joined batches."""
    parts = _rank_parts(STEPS * setup.get("accumulate", 1))
    ranks = _train(parts, tmp_path / "ddp", **setup)
    (single,) = _train(_concatenated(parts), tmp_path / "single", **setup)
    return ranks, single


# -- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_ranks_train_like_one_process_on_both_batches(method, optimizer, tmp_path):
    ranks, single = _ddp_and_single(tmp_path, method=method, optimizer=optimizer)

    _assert_ranks_identical(ranks)
    assert _max_difference(ranks[0]["params"], single["params"]) < 1e-10
    assert _max_difference(single["params"], _initial_params(tiny_bert())) > 1e-3
    assert [rank["training_step_calls"] for rank in ranks] == [STEPS * PASSES[method]] * 2


@pytest.mark.parametrize("method", sorted(METHODS))
def test_weight_target_keeps_ranks_identical(method, tmp_path):
    # One norm over the batch's rows: not the single-process run, but still all-reduced.
    ranks = _train(_rank_parts(STEPS), tmp_path, method=method, target="weight")

    _assert_ranks_identical(ranks)
    assert [rank["training_step_calls"] for rank in ranks] == [STEPS * PASSES[method]] * 2


def test_manual_optimization(tmp_path):
    ranks, single = _ddp_and_single(tmp_path, manual=True)

    _assert_ranks_identical(ranks)
    assert _max_difference(ranks[0]["params"], single["params"]) < 1e-10


@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_gradient_accumulation(method, tmp_path):
    ranks, single = _ddp_and_single(tmp_path, method=method, accumulate=2)

    _assert_ranks_identical(ranks)
    assert _max_difference(ranks[0]["params"], single["params"]) < 1e-10
    assert [rank["training_step_calls"] for rank in ranks] == [2 * STEPS * PASSES[method]] * 2


def _direct_call(trainer: pl.Trainer, pl_module: pl.LightningModule, name: str,
                 *args: Any) -> Any:
    return getattr(pl_module, name)(*args)


@pytest.mark.parametrize("setup", [
    {"method": "fgm"}, {"method": "pgd"}, {"manual": True}, {"accumulate": 2},
], ids=["fgm", "pgd", "manual", "accumulation"])
def test_a_pass_bypassing_the_wrapper_would_be_caught(setup, monkeypatch, tmp_path):
    """The runs above with the adversarial forward calling the module directly: the reducer
    is not armed for its backward, each rank steps on its own adversarial gradient, and the
    ranks drift apart. The equalities asserted above are what catch it."""
    monkeypatch.setattr(_lightning, "call_through_wrapper", _direct_call)
    ranks, single = _ddp_and_single(tmp_path, **setup)

    assert _max_difference(ranks[0]["params"], ranks[1]["params"]) > 1e-6
    assert _max_difference(ranks[0]["params"], single["params"]) > 1e-6


class _PoisonedClassifier(Classifier):
    """On one rank and one step, the gradient of the embedding output the callback captures
    is ``fill`` (NaN, inf or 0) everywhere; the weight still gets a finite gradient.

    Two forward hooks on the word embedding do it. The first, registered before the
    callback's, hands on a copy of the output and zeroes non-finite gradients flowing back
    into the weight; the second, registered after it, hands on another copy whose gradient
    it replaces by ``fill``, so the output the callback watches receives ``fill``.
    """

    def __init__(self, model: torch.nn.Module, fill: float, rank: int = 1, step: int = 1,
                 lr: float = 0.1) -> None:
        super().__init__(model, lr)
        self.fill, self.poison_rank, self.poison_step = fill, rank, step
        self.model.get_input_embeddings().register_forward_hook(_shield)

    def on_train_start(self) -> None:
        # The callback attaches its own hook at `setup`, which runs before this.
        self.model.get_input_embeddings().register_forward_hook(self._poison)

    def _poison(self, module: torch.nn.Module, args: Any, output: Tensor) -> Tensor | None:
        poisoned_now = (self.global_rank == self.poison_rank
                        and self.trainer.global_step == self.poison_step)
        if not poisoned_now or not output.requires_grad:
            return None
        copy = output.clone()
        copy.register_hook(lambda grad: torch.full_like(grad, self.fill))
        return copy


def _shield(module: torch.nn.Module, args: Any, output: Tensor) -> Tensor | None:
    if not output.requires_grad:
        return None
    output.register_hook(lambda grad: torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0))
    return output.clone()


@pytest.mark.parametrize(("method", "fill"), [
    ("fgm", float("nan")), ("fgsm", float("inf")), ("pgd", float("nan")), ("fgm", 0.0),
])
def test_unusable_gradient_on_one_rank_gives_zero_perturbation_there(method, fill, tmp_path):
    """No rank skips the adversarial pass on its own: where the gradient is NaN, inf or zero,
    the perturbation is zero and the passes still run, so both ranks make the same
    collectives and the fit ends."""
    cls, args = METHODS[method]
    module = _PoisonedClassifier(tiny_bert(), fill=fill, rank=1, step=1)
    ranks = _fit(module, _recording(cls)(target="output", **args), _rank_parts(STEPS),
                 tmp_path)

    assert [rank["training_step_calls"] for rank in ranks] == [STEPS * PASSES[method]] * 2
    norms = [torch.stack(rank["norms"]) for rank in ranks]  # (steps, examples) per rank
    assert norms[1][1].eq(0).all()
    assert norms[1][[0, 2]].gt(0).all()
    assert norms[0].gt(0).all()
    _assert_ranks_identical(ranks)
    assert all(value.isfinite().all() for value in ranks[0]["params"].values())


OTHER_METHODS = {
    "freelb": lambda: FreeLB(loss_fn="compute_loss", epsilon_scale="relative", alpha=0.05,
                             init_magnitude=0.02, max_norm=0.1, steps=2),
    "smart": lambda: SMART(loss_fn="compute_loss", epsilon=1e-3, alpha=1e-3, noise_std=1e-3),
    "vat": lambda: VAT(loss_fn="compute_loss", epsilon=0.05, xi=0.01, epsilon_scale="relative"),
    "r3f": lambda: R3F(loss_fn="compute_loss", epsilon=1e-3),
    "awp": lambda: AWP(loss_fn="compute_loss"),
}


@pytest.mark.parametrize("method", sorted(OTHER_METHODS))
def test_every_other_method_keeps_ranks_identical(method, tmp_path):
    # Random starts and per-rank gradients make these differ from one process on the joined
    # batches, but every pass is all-reduced: the ranks must stay bitwise identical.
    module = Classifier(tiny_bert(), lr=0.1)
    ranks = _fit(module, OTHER_METHODS[method](), _rank_parts(STEPS), tmp_path)
    _assert_ranks_identical(ranks)
    start = _initial_params(tiny_bert())
    assert _max_difference(ranks[0]["params"], start) > 0
