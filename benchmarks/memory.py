"""Peak resident memory of a few training steps per method, each in a process of its own.

Every configuration runs in a fresh Python process (``--child KEY``) that builds the model,
trains ``--steps`` optimizer steps with every step attacked, and reports
``resource.getrusage(RUSAGE_SELF).ru_maxrss``. The parent compares each peak with the no
attack run of the same runner (Lightning or the plain loop) and with one unperturbed
extra forward and backward, which every one-pass method needs at least: what a method
adds beyond that is its own bookkeeping (backups, perturbations, gradient copies).

Run ``python -m benchmarks.memory`` (minutes) or ``--quick`` (tiny model, few processes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import (
    MINILM,
    QUICK,
    ModelSize,
    base_parser,
    callback_methods,
    load_note,
    machine_summary,
    save_figure,
    touched_rows,
    write_section,
)

__all__ = ["Config", "configs", "main", "run_child"]

SECTION = "memory"
FIGURE = "memory.png"
MB = 1e6


@dataclass(frozen=True)
class Config:
    """One process to measure: ``runner`` is ``"Lightning"`` or ``"plain PyTorch"``."""

    key: str
    label: str
    runner: str
    settings: str


def configs() -> list[Config]:
    """Every configuration in table order; the no-attack ones of each runner come first."""
    rows = [Config("none", "no attack", "Lightning", "no callback")]
    rows += [Config(m.key, m.label, "Lightning", m.settings) for m in callback_methods()]
    rows += [
        Config("plain_none", "no attack", "plain PyTorch", "plain loop"),
        Config("plain_extra", "one extra pass (no attack)", "plain PyTorch",
               "forward + backward of the clean batch"),
        Config("snippet_fgm", "snippet FGM", "plain PyTorch", "epsilon=1.0, whole matrix"),
        Config("snippet_pgd", "snippet PGD", "plain PyTorch",
               "epsilon=1.0, alpha=0.3, K=3, whole matrix"),
    ]
    return rows


QUICK_KEYS = ("none", "extra", "fgm", "plain_extra", "snippet_fgm")


def _peak_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def _resident_mb() -> float:
    """The resident set size now (Linux ``/proc/self/statm``), in MB."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / MB


class _LiveTensors:
    """The peak of tensor memory allocated during a block, above what was live at its
    start, from the torch profiler's memory records: exact, unlike the resident size,
    which also holds what the C allocator keeps cached or cannot return."""

    def __init__(self) -> None:
        self.peak_mb: float | None = None
        self._profile: Any = None

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()

    def stop(self) -> None:
        import tempfile

        self._profile.__exit__(None, None, None)
        with tempfile.TemporaryDirectory() as folder:
            trace = Path(folder) / "trace.json"
            self._profile.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text())["traceEvents"]
        totals = [event["args"]["Total Allocated"] for event in events
                  if event.get("name") == "[memory]"]
        self.peak_mb = max(totals, default=0) / MB


def run_child(key: str, size: ModelSize, steps: int, threads: int) -> dict[str, Any]:
    """Train ``steps`` steps of configuration ``key`` in this process and report its peak
    and its resident size after every step; then the peak of live tensors during one more
    step."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from benchmarks._common import BenchModule, build_model, make_batch, quiet_trainer
    from benchmarks.snippet import plain_step

    live, peak = _LiveTensors(), [0.0]

    # The measured steps come first; one more step then runs under the profiler, whose
    # own memory must not count in the resident figures.
    def before_step(index: int) -> None:
        if index == steps:
            peak[0] = _peak_mb()
            live.start()

    def after_step(index: int) -> None:
        if index == steps:
            live.stop()
        else:
            after_steps.append(_resident_mb())

    class AroundStep(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 batch: Any, batch_idx: int) -> None:
            before_step(batch_idx)

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                               outputs: Any, batch: Any, batch_idx: int) -> None:
            after_step(batch_idx)

    torch.set_num_threads(threads)
    model, batch = build_model(size), make_batch(size)
    before_training = _peak_mb()
    after_steps: list[float] = []
    if key == "none" or key in {m.key for m in callback_methods()}:
        callbacks = [m.build(0, 1) for m in callback_methods() if m.key == key]
        trainer = quiet_trainer([*callbacks, AroundStep()], max_steps=steps + 1)
        trainer.fit(BenchModule(model), DataLoader([batch] * (steps + 1), batch_size=None))
    else:
        kinds = {"plain_none": "none", "plain_extra": "extra", "snippet_fgm": "fgm",
                 "snippet_pgd": "pgd"}
        if key not in kinds:
            raise ValueError(f"Unknown configuration {key!r}.")
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        step = plain_step(kinds[key], model, optimizer, batch)
        for index in range(steps + 1):
            before_step(index)
            step()
            after_step(index)
    return {"key": key, "peak_mb": peak[0], "before_training_mb": before_training,
            "after_steps_mb": after_steps, "live_mb": live.peak_mb}


def _spawn(key: str, quick: bool, steps: int, threads: int,
           mmap_threshold: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.memory", "--child", key,
               "--steps", str(steps), "--threads", str(threads)]
    if quick:
        command.append("--quick")
    env = dict(os.environ)
    if mmap_threshold > 0:
        # A fixed threshold stops glibc from raising it after each large free, so every
        # tensor above it is mapped on allocation and unmapped on release: the peak then
        # follows the live tensors instead of what the allocator keeps cached.
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"Measuring {key!r} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@dataclass
class Measured:
    """The processes of one configuration: peak, and resident size after each step."""

    config: Config
    peaks: list[float]
    before_training: list[float]
    after_steps: list[list[float]]
    live: list[float]

    @property
    def peak(self) -> float:
        return statistics.median(self.peaks)

    @property
    def live_peak(self) -> float:
        """Median over processes of the live-tensor peak of one step after the measured ones."""
        return statistics.median(self.live)

    @property
    def growth(self) -> float | None:
        """Median over processes of the resident size gained per step after the second
        (the first allocates the optimizer state): memory a step leaves behind."""
        slopes = [(sizes[-1] - sizes[1]) / (len(sizes) - 2)
                  for sizes in self.after_steps if len(sizes) >= 3]
        return statistics.median(slopes) if slopes else None


def measure(chosen: list[Config], quick: bool, steps: int, threads: int, repeats: int,
            jobs: int, mmap_threshold: int) -> list[Measured]:
    """Run every configuration ``repeats`` times, ``jobs`` processes at a time.

    Peak memory is a per-process figure, so processes may run side by side; only the
    wall time suffers.
    """
    tasks = [(config, r) for r in range(repeats) for config in chosen]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(
            lambda task: _spawn(task[0].key, quick, steps, threads, mmap_threshold), tasks))
    measured = {config.key: Measured(config, [], [], [], []) for config in chosen}
    for (config, _), result in zip(tasks, results, strict=True):
        measured[config.key].peaks.append(result["peak_mb"])
        measured[config.key].before_training.append(result["before_training_mb"])
        measured[config.key].after_steps.append(result["after_steps_mb"])
        measured[config.key].live.append(result["live_mb"])
    return [measured[config.key] for config in chosen]


def _baselines(rows: list[Measured]) -> dict[str, dict[str, float]]:
    """Per runner, the peaks of its no-attack and one-extra-pass runs (``none``, ``extra``)
    and their live-tensor peaks (``live_none``, ``live_extra``)."""
    by_key = {row.config.key: row for row in rows}
    out: dict[str, dict[str, float]] = {"Lightning": {}, "plain PyTorch": {}}
    for runner, none, extra in (("Lightning", "none", "extra"),
                                ("plain PyTorch", "plain_none", "plain_extra")):
        for name, key in (("none", none), ("extra", extra)):
            if key in by_key:
                out[runner][name] = by_key[key].peak
                out[runner][f"live_{name}"] = by_key[key].live_peak
    return out


def markdown(rows: list[Measured], settings: dict[str, Any]) -> str:
    """The section of ``docs/benchmarks.md``: caption, table, findings and figure."""
    base = _baselines(rows)
    lines = [
        "## Peak memory",
        "",
        f"Peak resident set size (`ru_maxrss`) of a process that builds the model and trains "
        f"{settings['steps']} optimizer steps, every step attacked, each configuration in a "
        f"fresh process, "
        + ("one process each. " if settings["repeats"] == 1 else
           f"{settings['repeats']} processes each (median; range in brackets). ")
        + f"{settings['model']}; {settings['threads']} thread(s); AdamW. "
        f"\"Over no attack\" and \"over one extra pass\" subtract the peak of the same "
        f"runner's run without attack, and of its run with one unperturbed extra forward and "
        f"backward. \"Kept per step\" is how much the resident size grows per step after the "
        f"second: memory a step leaves behind. \"Live tensors\" is the exact peak of tensor "
        f"memory allocated during one further step above what was live when it began, from the "
        f"torch profiler's memory records, over the same runner's one extra pass: the "
        f"resident size also holds what the C allocator keeps or cannot return (a few MB). "
        f"The batch touches {settings['distinct']:,} "
        f"distinct embedding rows at {settings['positions']:,} positions: "
        f"{settings['rows_mb']:.1f} MB as float32 rows, one per position (what the weight "
        f"target backs up); the whole embedding matrix is {settings['matrix_mb']:.1f} MB. "
        f"{_allocator(settings['mmap_threshold'])}",
        "",
        f"Machine: {settings['machine']}. {settings['load']} Wall time "
        f"{settings['wall']:.0f} s.",
        "",
        "| method | settings | runner | peak MB | over no attack, MB | over one extra pass, MB "
        "| live tensors over one extra pass, MB | kept per step, MB |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        runner = row.config.runner
        spread = f" [{min(row.peaks):.0f}-{max(row.peaks):.0f}]" if len(row.peaks) > 1 else ""
        over_none = _difference(row.peak, base[runner].get("none"))
        over_extra = _difference(row.peak, base[runner].get("extra"))
        live = _difference(row.live_peak, base[runner].get("live_extra"), digits=2)
        growth = "" if row.growth is None else f"{row.growth:+.1f}"
        lines.append(
            f"| {row.config.label} | {row.config.settings} | {runner} | {row.peak:.1f}"
            f"{spread} | {over_none} | {over_extra} | {live} | {growth} |"
        )
    lines += ["", *findings(rows, settings), "", f"![Peak memory per method](img/{FIGURE})", ""]
    return "\n".join(lines)


def _allocator(threshold: int) -> str:
    if threshold <= 0:
        return (
            "The processes ran with glibc's default allocator settings, under which freed "
            "memory is partly kept for reuse: peaks then vary by tens of MB between identical "
            "runs and follow the allocator's cache more than the live tensors."
        )
    return (
        f"The processes ran with `MALLOC_MMAP_THRESHOLD_={threshold}`: every allocation of "
        f"{threshold // 1024} KiB or more is mapped when made and returned when freed, so the "
        "peak follows the live tensors (glibc's default raises the threshold as large blocks "
        "are freed and then keeps freed memory cached, which adds tens of MB of noise)."
    )


def _difference(value: float, reference: float | None, digits: int = 1) -> str:
    return "" if reference is None else f"{value - reference:+.{digits}f}"


def findings(rows: list[Measured], settings: dict[str, Any]) -> list[str]:
    """The two comparisons the section exists for, with the numbers filled in."""
    by_key = {row.config.key: row for row in rows}
    lines = []
    if "fgm" in by_key and "extra" in by_key:
        added = by_key["fgm"].peak - by_key["extra"].peak
        live = by_key["fgm"].live_peak - by_key["extra"].live_peak
        rows_mb = settings["rows_mb"]
        lines.append(
            f"- FGM on the weight target holds {live:+.2f} MB of live tensors over one extra "
            f"pass: its backup of the touched rows, one float32 row per position "
            f"({rows_mb:.2f} MB; the batch has {settings['distinct']:,} distinct rows, "
            f"{settings['distinct_mb']:.2f} MB), and {live - rows_mb:+.2f} MB of token indices "
            f"and masks. "
            + ("" if live <= 1.5 * rows_mb else "**That is more than one copy of the rows.** ")
            + f"Its resident peak is {added:+.1f} MB over one extra pass, allocator cache "
            f"included."
        )
    if "snippet_fgm" in by_key and "plain_extra" in by_key:
        added = by_key["snippet_fgm"].peak - by_key["plain_extra"].peak
        lines.append(
            f"- The snippet's FGM adds {added:+.1f} MB over one extra pass of the same plain "
            f"loop: its full copy of the {settings['matrix_mb']:.1f} MB embedding matrix."
        )
    kept = [row for row in rows if row.growth is not None and row.growth > 1.0]
    if kept:
        names = ", ".join(f"{row.config.label} ({row.growth:+.1f} MB)" for row in kept)
        lines.append(
            f"- Memory kept from step to step (a leak if it keeps growing): {names}; the "
            f"embedding output of the batch and its gradient are "
            f"{settings['output_mb']:.1f} MB each."
        )
    return lines


def plot(rows: list[Measured], path: Path, title: str, matrix_mb: float) -> None:
    """Bars of the peak over no attack of the same runner, per configuration; over each
    runner's bars, its one-extra-pass level and that level plus one embedding matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = _baselines(rows)
    shown = [row for row in rows if row.config.key not in ("none", "plain_none")]
    values = [row.peak - base[row.config.runner].get("none", row.peak) for row in shown]
    colours = ["#999999" if row.config.key in ("extra", "plain_extra") else
               "#d95f02" if row.config.runner != "Lightning" else "#1b9e77" for row in shown]
    labels = [row.config.label.replace(" (", "\n(") +
              ("\n[plain]" if row.config.runner != "Lightning" else "") for row in shown]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.8 * len(shown)), 4.6))
    bars = ax.bar(range(len(shown)), values, color=colours)
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(f"{value:+.0f}", (bar.get_x() + bar.get_width() / 2, max(value, 0)),
                    textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    for runner in ("Lightning", "plain PyTorch"):
        level = base[runner].get("extra")
        spots = [i for i, row in enumerate(shown) if row.config.runner == runner]
        if level is None or not spots:
            continue
        level -= base[runner].get("none", level)
        left, right = min(spots) - 0.45, max(spots) + 0.45
        ax.hlines(level, left, right, color="#e7298a", linestyle="--", linewidth=1,
                  label="one extra pass" if runner == "Lightning" else "_nolegend_")
        ax.hlines(level + matrix_mb, left, right, color="#7570b3", linestyle=":",
                  linewidth=1.5, label=f"one extra pass + one embedding matrix "
                  f"({matrix_mb:.0f} MB)" if runner == "Lightning" else "_nolegend_")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(range(len(shown)), labels, fontsize=7)
    ax.set_ylabel("peak RSS over no attack (MB)")
    save_figure(fig, ax, path, title)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__, "tiny model and a few configurations, processes side by side")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per process (default 5; quick 3)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="processes per configuration (default 2; quick 1)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes at a time (default 1; quick 4)")
    parser.add_argument("--configs", nargs="*", default=None,
                        help="keys of the configurations (default: all)")
    parser.add_argument("--mmap-threshold", type=int, default=65536,
                        help="glibc MALLOC_MMAP_THRESHOLD_ of the measured processes, in "
                             "bytes (default 65536); 0 keeps the allocator's defaults")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Measured] | None:
    """Measure every configuration, write the table and the figure, print the table."""
    args = parse_args(argv)
    size: ModelSize = QUICK if args.quick else MINILM
    steps = args.steps or (3 if args.quick else 5)
    if args.child is not None:
        print(json.dumps(run_child(args.child, size, steps, args.threads)))
        return None

    repeats = args.repeats or (1 if args.quick else 2)
    jobs = args.jobs or (4 if args.quick else 1)
    wanted = args.configs or (list(QUICK_KEYS) if args.quick else None)
    chosen = [c for c in configs() if wanted is None or c.key in wanted]
    load_before, started = os.getloadavg(), time.perf_counter()
    rows = measure(chosen, args.quick, steps, args.threads, repeats, jobs, args.mmap_threshold)

    from benchmarks._common import make_batch

    distinct, positions = touched_rows(make_batch(size))
    settings = {
        "model": size.describe(), "threads": args.threads, "steps": steps, "repeats": repeats,
        "distinct": distinct, "positions": positions,
        "rows_mb": positions * size.hidden_size * 4 / MB,
        "distinct_mb": distinct * size.hidden_size * 4 / MB,
        "output_mb": size.batch_size * size.seq_len * size.hidden_size * 4 / MB,
        "matrix_mb": size.vocab_size * size.hidden_size * 4 / MB,
        "machine": machine_summary(), "load": load_note(load_before, os.getloadavg()),
        "wall": time.perf_counter() - started, "mmap_threshold": args.mmap_threshold,
    }
    text = markdown(rows, settings)
    write_section(args.out / "benchmarks.md", SECTION, text)
    plot(rows, args.out / "img" / FIGURE,
         f"Peak memory over no attack, {size.name}, batch {size.batch_size} x {size.seq_len}, "
         f"{steps} steps", settings["matrix_mb"])
    print(text)
    return rows


if __name__ == "__main__":
    main()
