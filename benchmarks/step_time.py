"""Seconds per optimizer step of every method, as a ratio to the same run's unattacked steps.

Each callback trains through a real Lightning ``Trainer`` with ``start_step=1,
every_n_steps=2``: odd steps are attacked, even steps are not, so a step without attack
and a step with it always run side by side and load on the machine hits both alike. The
ratio of a method is the median over adjacent (unattacked, attacked) pairs of their time
ratio, after a warm-up. In the same process a plain PyTorch loop times the user's original
FGM and PGD (``benchmarks/snippet.py``) against its own plain step, alternating the same way.

The floor is what one extra forward and backward must cost at least:
``1 + t(forward + backward) / t(step)``, with both times taken on the unattacked steps of
each run (from the batch start to ``on_after_backward``, and to the batch end).

Run ``python -m benchmarks.step_time`` (minutes) or ``--quick`` (seconds, tiny model).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from benchmarks._common import (
    MINILM,
    QUICK,
    BenchModule,
    Method,
    ModelSize,
    base_parser,
    build_model,
    callback_methods,
    load_note,
    machine_summary,
    make_batch,
    quantiles,
    quiet_trainer,
    save_figure,
    write_section,
)
from benchmarks.snippet import plain_step

__all__ = ["Row", "main", "measure_callback", "measure_plain"]

SECTION = "step-time"
FIGURE = "step_time.png"


@dataclass
class Row:
    """One line of the table: a method's step times next to the unattacked ones."""

    key: str
    label: str
    settings: str
    runner: str
    base_seconds: list[float]
    method_seconds: list[float]
    ratios: list[float]
    cpu_ratios: list[float]
    floor: float | None = None
    target: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> float:
        """Median over step pairs of (attacked time / unattacked time)."""
        return statistics.median(self.ratios)

    @property
    def ratio_of_medians(self) -> float:
        return statistics.median(self.method_seconds) / statistics.median(self.base_seconds)

    @property
    def cpu_ratio(self) -> float:
        """Median over step pairs of the ratio of process CPU times."""
        return statistics.median(self.cpu_ratios)


@dataclass(frozen=True)
class StepTimes:
    """Wall and process CPU seconds of one step, and wall seconds to its clean backward's
    end (``forward_backward``; the whole step for the plain loop's steps)."""

    wall: float
    cpu: float
    forward_backward: float


class StepTimer(pl.Callback):
    """Times each training batch; put it first in the callback list and :meth:`closer` last.

    Records, per optimizer step, the time to the end of the clean backward (this
    callback's ``on_after_backward`` runs before any later callback's) and to the end of
    the batch (after the optimizer step and every other callback's batch-end hook).
    """

    def __init__(self) -> None:
        self.records: dict[int, StepTimes] = {}
        self._step = 0
        self._start = 0.0
        self._cpu_start = 0.0
        self._backward_done: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step
        self._backward_done = None
        self._cpu_start = time.process_time()
        self._start = time.perf_counter()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._backward_done is None:
            self._backward_done = time.perf_counter()

    def finish(self) -> None:
        end = time.perf_counter()
        cpu = time.process_time() - self._cpu_start
        backward = self._backward_done if self._backward_done is not None else end
        self.records[self._step] = StepTimes(end - self._start, cpu, backward - self._start)

    def closer(self) -> pl.Callback:
        return _BatchEnd(self)


class _BatchEnd(pl.Callback):
    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.timer.finish()


def _pairs(records: dict[int, StepTimes],
           warmup_pairs: int) -> list[tuple[StepTimes, StepTimes]]:
    """Adjacent (even step, odd step) records after the warm-up."""
    return [
        (records[step], records[step + 1])
        for step in sorted(records)
        if step % 2 == 0 and step + 1 in records and step // 2 >= warmup_pairs
    ]


def _row(key: str, label: str, settings: str, runner: str,
         pairs: list[tuple[StepTimes, StepTimes]], floor: float | None) -> Row:
    return Row(
        key, label, settings, runner,
        base_seconds=[base.wall for base, _ in pairs],
        method_seconds=[other.wall for _, other in pairs],
        ratios=[other.wall / base.wall for base, other in pairs],
        cpu_ratios=[other.cpu / base.cpu for base, other in pairs],
        floor=floor,
    )


def measure_callback(method: Method | None, master: torch.nn.Module, batch: dict[str, Any],
                     pairs: int, warmup_pairs: int) -> Row:
    """Train ``2 * (warmup_pairs + pairs)`` steps with ``method`` attacking odd steps only.

    ``method=None`` trains with no callback: the ratio of odd to even steps then measures
    the noise of the procedure itself.
    """
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    if method is not None:
        callbacks.append(method.build(1, 2))
    callbacks.append(timer.closer())
    steps = 2 * (warmup_pairs + pairs)
    module = BenchModule(copy.deepcopy(master))
    trainer = quiet_trainer(callbacks, max_steps=steps)
    trainer.fit(module, DataLoader([batch] * steps, batch_size=None))
    _check_attacked(method, callbacks, steps)

    timed = _pairs(timer.records, warmup_pairs)
    floor = 1 + statistics.median(base.forward_backward / base.wall for base, _ in timed)
    if method is None:
        return _row("none", "no attack (odd / even steps)", "no callback", "Lightning",
                    timed, floor)
    return _row(method.key, method.label, method.settings, "Lightning", timed, floor)


def _check_attacked(method: Method | None, callbacks: list[pl.Callback], steps: int) -> None:
    if method is None:
        return
    callback = callbacks[1]
    done = getattr(callback, "attacked_steps", getattr(callback, "passes", None))
    if done != steps // 2:
        raise RuntimeError(
            f"{method.label}: expected {steps // 2} attacked steps of {steps}, got {done}."
        )


def measure_plain(master: torch.nn.Module, batch: dict[str, Any], pairs: int,
                  warmup_pairs: int) -> tuple[list[Row], float]:
    """The plain loop: (plain step, snippet step) pairs, and the plain floor."""
    model = copy.deepcopy(master).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    base = plain_step("none", model, optimizer, batch)
    kinds = {
        "fgm": ("snippet FGM", "epsilon=1.0, whole matrix, plain loop"),
        "pgd": ("snippet PGD", "epsilon=1.0, alpha=0.3, K=3, whole matrix, plain loop"),
        "fb": ("", ""),
    }
    steps = {kind: plain_step(kind, model, optimizer, batch) for kind in kinds}
    times: dict[str, list[tuple[StepTimes, StepTimes]]] = {kind: [] for kind in kinds}
    for round_index in range(warmup_pairs + pairs):
        for kind, step in steps.items():
            base_time, step_time = _timed(base), _timed(step)
            if round_index >= warmup_pairs:
                times[kind].append((base_time, step_time))
    floor = 1 + statistics.median(fb.wall / plain.wall for plain, fb in times["fb"])
    rows = [_row(f"snippet_{kind}", *kinds[kind], "plain PyTorch", times[kind], floor)
            for kind in ("fgm", "pgd")]
    return rows, floor


def _timed(step: Any) -> StepTimes:
    cpu_start, start = time.process_time(), time.perf_counter()
    step()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return StepTimes(wall, cpu, wall)


TARGETS = {"pgd": 3.4, "r3f": 2.05, "awp": 2.05, "smart": 2.7, "freelb": 4 * 1.03}


def judge(rows: list[Row]) -> None:
    """Fill each row's target and whether it was met."""
    by_key = {row.key: row for row in rows}
    snippet_fgm = by_key.get("snippet_fgm")
    fgm = by_key.get("fgm")
    if fgm is not None and fgm.floor is not None:
        limit = 1.03 * fgm.floor
        fgm.target = f"<= 1.03 x floor = {limit:.2f}"
        fgm.met = fgm.ratio <= limit
        if snippet_fgm is not None:
            fgm.target += f"; < snippet FGM ({snippet_fgm.ratio:.2f})"
            fgm.met = fgm.met and fgm.ratio < snippet_fgm.ratio
    for key, limit in TARGETS.items():
        if key in by_key:
            by_key[key].target = f"<= {limit:.2f}"
            by_key[key].met = by_key[key].ratio <= limit


def markdown(rows: list[Row], settings: dict[str, Any]) -> str:
    """The section of ``docs/benchmarks.md``: caption, table and figure."""
    lines = [
        "## Step time",
        "",
        f"Median seconds per optimizer step and its ratio to a step without attack. "
        f"{settings['model']}; {settings['threads']} threads; AdamW; dropout 0.1. Callbacks "
        f"run through a Lightning `Trainer` attacking every other step "
        f"(`start_step=1, every_n_steps=2`); the ratio is the median over "
        f"{settings['pairs']} adjacent (unattacked, attacked) step pairs after "
        f"{settings['warmup_pairs']} warm-up pairs, with the interquartile range of the pair "
        f"ratios; targets are judged on it. Also shown: the ratio of the median step times, "
        f"and the median pair ratio of process CPU time (both threads), which other load on "
        f"the machine disturbs less than wall time. The snippet rows run a plain PyTorch "
        f"loop with the user's original FGM and PGD (rebuilt in `benchmarks/snippet.py`, "
        f"PGD stepping along the gradient), each against the same loop's plain step. The "
        f"floor of one extra pass is `1 + t(forward+backward) / t(step)` from the "
        f"unattacked steps of the same run (pooled over the Lightning runs: "
        f"{settings['floor']:.3f}; plain loop: {settings['plain_floor']:.3f}). Callbacks "
        f"use `loss_fn=\"compute_loss\"`, which returns the logits, so SMART, VAT and R3F "
        f"get the clean logits from the clean pass.",
        "",
        f"Machine: {settings['machine']}. {settings['load']} Wall time "
        f"{settings['wall']:.0f} s.",
        "",
        "| method | settings | runner | s/step, no attack | s/step, method | ratio of medians "
        "| ratio (median of pairs) | IQR of pairs | CPU-time ratio | floor (this run) "
        "| target | met |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|---|---|",
    ]
    for row in rows:
        q1, _, q3 = quantiles(row.ratios)
        met = "" if row.met is None else ("yes" if row.met else "**no**")
        floor = "" if row.floor is None else f"{row.floor:.3f}"
        lines.append(
            f"| {row.label} | {row.settings} | {row.runner} | "
            f"{statistics.median(row.base_seconds):.3f} | "
            f"{statistics.median(row.method_seconds):.3f} | {row.ratio_of_medians:.3f} | "
            f"{row.ratio:.3f} | {q1:.2f}-{q3:.2f} | {row.cpu_ratio:.3f} | {floor} | "
            f"{row.target} | {met} |"
        )
    lines += ["", f"![Step-time ratio per method](img/{FIGURE})", ""]
    return "\n".join(lines)


def plot(rows: list[Row], floor: float, path: Path, title: str) -> None:
    """Bar chart of the ratio per method, the floor as a line, targets as ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    short = {"none": "none\n(odd/even)", "extra": "extra pass\n(no attack)"}
    labels = [short.get(row.key, row.label.replace(" (", "\n(")) for row in rows]
    ratios = [row.ratio for row in rows]
    colours = ["#999999" if row.key in ("none", "extra") else
               "#d95f02" if row.runner != "Lightning" else "#1b9e77" for row in rows]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.8 * len(rows)), 4.8))
    bars = ax.bar(range(len(rows)), ratios, color=colours)
    for bar, row in zip(bars, rows, strict=True):
        q1, _, q3 = quantiles(row.ratios)
        centre = bar.get_x() + bar.get_width() / 2
        ax.vlines(centre, q1, q3, color="black", linewidth=1)
        ax.annotate(f"{row.ratio:.2f}", (centre, row.ratio), textcoords="offset points",
                    xytext=(0, 3), ha="center", fontsize=8)
        limit = TARGETS.get(row.key)
        if row.key == "fgm" and row.floor is not None:
            limit = 1.03 * row.floor
        if limit is not None:
            first = "target" not in ax.get_legend_handles_labels()[1]
            ax.hlines(limit, bar.get_x(), bar.get_x() + bar.get_width(), color="#7570b3",
                      linewidth=2, label="target" if first else "_nolegend_")
    ax.axhline(floor, color="#e7298a", linestyle="--", linewidth=1,
               label=f"floor of one extra pass ({floor:.2f})")
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=0)
    ax.set_ylabel("seconds per step / seconds without attack")
    save_figure(fig, ax, path, title)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__, "tiny model and few steps: checks the script runs, in seconds")
    parser.add_argument("--pairs", type=int, default=None,
                        help="timed (unattacked, attacked) step pairs per method (default 8)")
    parser.add_argument("--warmup-pairs", type=int, default=None,
                        help="untimed pairs first (default 2)")
    parser.add_argument("--methods", nargs="*", default=None,
                        help="keys of the callbacks to time (default: all)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Measure, write the table and the figure, print the table; returns the rows."""
    args = parse_args(argv)
    size: ModelSize = QUICK if args.quick else MINILM
    pairs = args.pairs or (2 if args.quick else 8)
    warmup_pairs = args.warmup_pairs if args.warmup_pairs is not None else (
        1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)
    load_before, started = os.getloadavg(), time.perf_counter()

    master, batch = build_model(size), make_batch(size)
    methods = [m for m in callback_methods() if args.methods is None or m.key in args.methods]
    rows = [measure_callback(None, master, batch, pairs, warmup_pairs)]
    for method in methods:
        print(f"timing {method.label} ...", file=sys.stderr, flush=True)
        rows.append(measure_callback(method, master, batch, pairs, warmup_pairs))
    print("timing the plain loop ...", file=sys.stderr, flush=True)
    plain_rows, plain_floor = measure_plain(master, batch, pairs, warmup_pairs)
    rows += plain_rows
    judge(rows)

    lightning_floors = [row.floor for row in rows if row.runner == "Lightning" and row.floor]
    floor = statistics.median(lightning_floors)
    settings = {
        "model": size.describe(), "threads": args.threads, "pairs": pairs,
        "warmup_pairs": warmup_pairs, "floor": floor, "plain_floor": plain_floor,
        "machine": machine_summary(), "load": load_note(load_before, os.getloadavg()),
        "wall": time.perf_counter() - started,
    }
    text = markdown(rows, settings)
    write_section(args.out / "benchmarks.md", SECTION, text)
    plot(rows, floor, args.out / "img" / FIGURE,
         f"Step time over no attack, {size.name}, batch {size.batch_size} x {size.seq_len}, "
         f"{args.threads} threads")
    print(text)
    return rows


if __name__ == "__main__":
    main()
