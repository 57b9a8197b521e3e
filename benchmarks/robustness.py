"""Clean accuracy and accuracy under attack of the sentiment example's methods.

Each method of ``examples/sentiment/configs`` is trained the way
``examples/sentiment/compare.py`` trains it (same configs, seeds 1..n, same overrides), or
loaded from checkpoints of earlier runs (``--checkpoints fgm=path.ckpt ...``), and then
tested with :class:`lightning_adv.RobustAccuracy`: PGD on the embedding output, per-example
L2 ball. The attack budget of a method is its own training budget where it has one in
that geometry (FGM, PGD and VAT ``epsilon``, FreeLB ``max_norm``, SMART ``epsilon`` with
``norm="l2"``, FGSM and R3F ``epsilon`` with ``epsilon_scale="relative"``; same number
and ``epsilon_scale``), otherwise the FGM config's; every model is attacked at that
budget and at twice it, the no-attack models at every method's budgets, and each method
is compared with the no-attack models at its own budgets.

Checkpoints can be attacked by several worker processes (``--jobs 2``), and with
``--results DIR`` each checkpoint's scores are kept in ``DIR`` and reused: a later
invocation attacks only the budgets that are missing, so a measurement can be made in
parts (each part's command listing the checkpoints it attacks) and tabulated by a last
command that lists them all.

Target of the issue: every attack method at least 10 points of robust accuracy over no
attack, without losing clean accuracy.

Run ``python -m benchmarks.robustness`` (hours on two cores: it trains every method for
every seed), ``--checkpoints ...`` (minutes) or ``--quick`` (a smoke run, numbers
meaningless).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import json
import logging
import math
import multiprocessing
import os
import re
import statistics
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks._common import load_note, machine_summary, write_section
from lightning_adv import AdversarialCallback, RobustAccuracy

__all__ = ["Budget", "Evaluated", "evaluate", "main", "training_budget"]

SECTION = "robustness"
FIGURE = "robustness.png"
BASELINE = "none"
#: Where a method's training budget sits, for callbacks that have one in RobustAccuracy's
#: geometry (L2, per example on the embedding output, or the same number on the rows).
#: A callback with a ``norm`` attribute counts only with ``norm="l2"``.
L2_BUDGET = {"FGM": "epsilon", "PGD": "epsilon", "VAT": "epsilon", "FreeLB": "max_norm",
             "SMART": "epsilon"}
#: Sizes that are an L2 size relative to what is perturbed only with
#: ``epsilon_scale="relative"``: an FGSM sign step of relative ``epsilon`` has exactly
#: ``epsilon`` times each row's norm, and R3F's normal noise has it in expectation.
RELATIVE_L2_BUDGET = {"FGSM": "epsilon", "R3F": "epsilon"}
KNOWN = {*L2_BUDGET, *RELATIVE_L2_BUDGET}
#: ``--quick``: two methods, one seed, a tiny budget; the numbers mean nothing.
QUICK: dict[str, Any] = {
    "methods": ["none", "fgm"], "seeds": 1, "epochs": 1, "max_examples": 200,
    "max_length": 32, "steps": 2, "max_batches": 1,
    "model": ["--model.hidden_size", "32", "--model.num_layers", "1", "--model.num_heads", "2",
              "--model.intermediate_size", "64"],
}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """An attack radius: ``epsilon`` read with ``epsilon_scale``, and where it came from."""

    epsilon: float
    epsilon_scale: str
    source: str

    def doubled(self) -> Budget:
        return Budget(2 * self.epsilon, self.epsilon_scale, f"2 x {self.source}")

    @property
    def key(self) -> tuple[float, str]:
        return (round(self.epsilon, 12), self.epsilon_scale)

    def describe(self) -> str:
        scale = "" if self.epsilon_scale == "absolute" else f" ({self.epsilon_scale})"
        return f"{self.epsilon:g}{scale}"


def training_budget(callbacks: Sequence[Any]) -> Budget | None:
    """The L2 budget of the first adversarial callback that has one, else ``None``."""
    for callback in callbacks:
        if not isinstance(callback, AdversarialCallback):
            continue
        name = type(callback).__name__
        attribute = L2_BUDGET.get(name)
        normal = getattr(callback, "noise", "normal") == "normal"
        if callback.epsilon_scale == "relative" and normal:
            attribute = attribute or RELATIVE_L2_BUDGET.get(name)
        if attribute is not None and getattr(callback, "norm", "l2") == "l2":
            return Budget(float(getattr(callback, attribute)), callback.epsilon_scale,
                          f"{name} {attribute}")
    return None


def _callback_from_config(class_path: str, init_args: dict[str, Any]) -> Any:
    module_name, _, class_name = class_path.rpartition(".")
    module = importlib.import_module(module_name or "lightning_adv")
    return getattr(module, class_name)(**init_args)


def config_callbacks(config: dict[str, Any]) -> list[Any]:
    """The adversarial callbacks a LightningCLI config describes, instantiated."""
    entries = (config.get("trainer") or {}).get("callbacks") or []
    found = []
    for entry in entries if isinstance(entries, list) else [entries]:
        class_path = entry.get("class_path", "") if isinstance(entry, dict) else ""
        if class_path.startswith("lightning_adv") or class_path in KNOWN:
            found.append(_callback_from_config(class_path, entry.get("init_args") or {}))
    return found


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else {}


def reference_budget(config_dir: Path) -> Budget:
    """The FGM config's budget: the attack every method without its own is tested at."""
    path = config_dir / "fgm.yaml"
    if path.is_file():
        budget = training_budget(config_callbacks(_read_yaml(path)))
        if budget is not None:
            return Budget(budget.epsilon, budget.epsilon_scale, "FGM config epsilon")
    return Budget(0.1, "absolute", "default")


def checkpoint_budget(path: Path) -> Budget | None:
    """A checkpoint's training budget: from the run's ``config.yaml`` beside
    ``checkpoints/`` when there is one, else from the callback state keys it holds."""
    config = path.parent.parent / "config.yaml"
    if config.is_file():
        return training_budget(config_callbacks(_read_yaml(config)))
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key in state.get("callbacks", {}):
        match = re.fullmatch(r"(\w+)(\{.*\})", str(key))
        if match and match.group(1) in KNOWN:
            fields = ast.literal_eval(match.group(2))
            return training_budget([_callback_from_config(match.group(1), fields)])
    return None


@dataclass
class Evaluated:
    """One trained model's scores: clean accuracy on the whole split, and per budget the
    accuracy under attack and the clean accuracy on the same (attacked) batches."""

    method: str
    seed: str
    budget: Budget
    accuracy: float
    robust: dict[tuple[float, str], float] = field(default_factory=dict)
    robust_clean: dict[tuple[float, str], float] = field(default_factory=dict)

    def merged(self, newer: Evaluated) -> Evaluated:
        """These scores with ``newer``'s added (``newer`` wins where both have a budget)."""
        return Evaluated(self.method, self.seed, newer.budget, newer.accuracy,
                         {**self.robust, **newer.robust},
                         {**self.robust_clean, **newer.robust_clean})

    def save(self, path: Path, settings: dict[str, Any]) -> None:
        scores = [[eps, scale, self.robust[eps, scale], self.robust_clean[eps, scale]]
                  for eps, scale in self.robust]
        record = {"settings": settings, "method": self.method, "run": self.seed,
                  "budget": asdict(self.budget),
                  "accuracy": self.accuracy, "scores": scores}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path, settings: dict[str, Any]) -> Evaluated | None:
        """The scores kept in ``path``, if it exists and was measured with ``settings``."""
        if not path.is_file():
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("settings") != settings:
            return None
        found = cls(record["method"], record["run"], Budget(**record["budget"]),
                    record["accuracy"])
        for eps, scale, robust, clean in record["scores"]:
            found.robust[eps, scale] = robust
            found.robust_clean[eps, scale] = clean
        return found


def evaluate(model: pl.LightningModule, datamodule: pl.LightningDataModule,
             budgets: Sequence[Budget], steps: int, max_batches: int | None,
             method: str, seed: str, budget: Budget,
             split: str = "test") -> Evaluated:
    """Test (or validate, ``split="val"``) ``model`` once, with one ``RobustAccuracy``
    per budget."""
    attacks = {
        b.key: RobustAccuracy(epsilon=b.epsilon, epsilon_scale=b.epsilon_scale,  # type: ignore[arg-type]
                              steps=steps, max_batches=max_batches, loss_fn="compute_loss",
                              label_key="labels", name=f"robust_{i}")
        for i, b in enumerate(budgets)
    }
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=list(attacks.values()))
    run = trainer.test if split == "test" else trainer.validate
    metrics = run(model, datamodule=datamodule, verbose=False)[0]
    result = Evaluated(method, seed, budget, float(metrics[f"{split}/acc"]))
    for key, attack in attacks.items():
        result.robust[key] = float(metrics[f"{split}_{attack.name}"])
        result.robust_clean[key] = float(metrics[f"{split}_{attack.name}_clean"])
    return result


@dataclass(frozen=True)
class Target:
    """A model to attack: a checkpoint, or a model trained in this process."""

    method: str
    run: str
    budget: Budget
    checkpoint: Path | None = None
    trained: tuple[pl.LightningModule, pl.LightningDataModule] | None = None


def attack_checkpoint(target: Target, budgets: Sequence[Budget], steps: int,
                      max_batches: int | None, split: str,
                      threads: int | None = None) -> Evaluated:
    """Load ``target``'s checkpoint and attack it at ``budgets`` (in a worker process
    with ``threads`` CPU threads, or in this one)."""
    if threads is not None:
        torch.set_num_threads(threads)
        _quiet()
    assert target.checkpoint is not None
    model, datamodule = load(target.checkpoint)
    return evaluate(model, datamodule, budgets, steps, max_batches, target.method,
                    target.run, target.budget, split)


def attack_all(targets: Sequence[Target], needed: dict[Target, list[Budget]], steps: int,
               max_batches: int | None, split: str, jobs: int = 1,
               results: Path | None = None) -> list[Evaluated]:
    """Every target's scores at its ``needed`` budgets, in ``targets``' order.

    With ``results``, checkpoints' scores are kept there and reused when they were
    measured with the same split, steps, batches and checkpoint file: only missing
    budgets are attacked. With ``jobs > 1`` checkpoints are attacked by that many worker
    processes of one CPU thread each, those with the most budgets first.
    """
    done: dict[Target, Evaluated] = {}
    todo: dict[Target, list[Budget]] = {}
    for target in targets:
        found = None
        if results is not None and target.checkpoint is not None:
            found = Evaluated.load(_result_file(results, target),
                                   _settings(target, steps, max_batches, split))
        if found is not None:
            done[target] = found
        missing = [b for b in needed[target] if found is None or b.key not in found.robust]
        if missing:
            todo[target] = missing
    if results is not None:
        print(f"{len(targets) - len(todo)} model(s) found complete in {results}, "
              f"{len(todo)} to attack.", flush=True)

    def report(target: Target, scores: Evaluated) -> None:
        done[target] = done[target].merged(scores) if target in done else scores
        if results is not None and target.checkpoint is not None:
            done[target].save(_result_file(results, target),
                              _settings(target, steps, max_batches, split))
        print(f"attacked {target.method} ({target.run}) at {len(todo[target])} budget(s)",
              flush=True)

    parallel = [t for t in todo if t.checkpoint is not None] if jobs > 1 else []
    if len(parallel) < 2:  # one checkpoint gains nothing from a worker process
        parallel = []
    if parallel:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = {pool.submit(attack_checkpoint, t, todo[t], steps, max_batches, split,
                                   1): t
                       for t in sorted(parallel, key=lambda t: -len(todo[t]))}
            for future in as_completed(futures):
                report(futures[future], future.result())
    for target in (t for t in todo if t not in parallel):
        if target.trained is not None:
            model, datamodule = target.trained
            report(target, evaluate(model, datamodule, todo[target], steps, max_batches,
                                    target.method, target.run, target.budget, split))
        else:
            report(target, attack_checkpoint(target, todo[target], steps, max_batches, split))
    return [done[target] for target in targets]


def _result_file(folder: Path, target: Target) -> Path:
    """``<method>-<run>-<hash of the checkpoint's path>.json``: checkpoints of the same name
    in different folders keep their own scores."""
    assert target.checkpoint is not None
    where = hashlib.sha1(str(target.checkpoint.resolve()).encode()).hexdigest()[:8]
    return folder / f"{target.method}-{target.run}-{where}.json"


def _settings(target: Target, steps: int, max_batches: int | None,
              split: str) -> dict[str, Any]:
    """What a kept score depends on, besides its budget."""
    assert target.checkpoint is not None
    stat = target.checkpoint.stat()
    return {"split": split, "steps": steps, "max_batches": max_batches,
            "checkpoint": target.checkpoint.name, "checkpoint_bytes": stat.st_size,
            "checkpoint_mtime_ns": stat.st_mtime_ns}


def train(config: Path, seed: int, overrides: list[str], save_to: Path | None,
          attack_from_start: bool = False,
          ) -> tuple[pl.LightningModule, pl.LightningDataModule, Budget | None]:
    """Train one config like the comparison script does; optionally keep a checkpoint."""
    from examples.sentiment.compare import quiet_cli

    cli = quiet_cli(config, seed, overrides, attack_from_start)
    cli.trainer.fit(cli.model, cli.datamodule)
    if save_to is not None:
        save_to.mkdir(parents=True, exist_ok=True)
        cli.trainer.save_checkpoint(save_to / f"{config.stem}-seed{seed}.ckpt")
    return cli.model, cli.datamodule, training_budget(cli.trainer.callbacks)


def load(path: Path) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """A model and its data module from a checkpoint of the sentiment example."""
    from examples.sentiment.data import SentimentDataModule
    from examples.sentiment.model import SentimentClassifier

    model = SentimentClassifier.load_from_checkpoint(path, map_location="cpu")
    datamodule = SentimentDataModule.load_from_checkpoint(path)
    return model, datamodule


@dataclass
class Row:
    method: str
    runs: int
    budget: Budget
    accuracy: list[float]
    attacked_clean: list[float]
    robust: list[float]
    robust_double: list[float]
    baseline_accuracy: float | None = None
    baseline_robust: float | None = None
    baseline_robust_double: float | None = None

    @property
    def met(self) -> bool | None:
        if self.method == BASELINE or self.baseline_robust is None:
            return None
        assert self.baseline_accuracy is not None
        gain = statistics.mean(self.robust) - self.baseline_robust
        return gain >= 0.10 and statistics.mean(self.accuracy) >= self.baseline_accuracy


def tabulate(results: list[Evaluated]) -> list[Row]:
    """One row per method: means over seeds, and the baseline at the method's budgets."""
    methods = list(dict.fromkeys(r.method for r in results))
    baseline = [r for r in results if r.method == BASELINE]
    rows = []
    for method in methods:
        runs = [r for r in results if r.method == method]
        budget = runs[0].budget
        double = budget.doubled()
        row = Row(method, len(runs), budget, [r.accuracy for r in runs],
                  [r.robust_clean[budget.key] for r in runs],
                  [r.robust[budget.key] for r in runs],
                  [r.robust[double.key] for r in runs])
        if baseline:
            row.baseline_accuracy = statistics.mean(r.accuracy for r in baseline)
            row.baseline_robust = statistics.mean(r.robust[budget.key] for r in baseline)
            row.baseline_robust_double = statistics.mean(r.robust[double.key] for r in baseline)
        rows.append(row)
    return rows


def _percent(values: Sequence[float]) -> str:
    mean = 100 * statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def _delta(values: Sequence[float], reference: float | None) -> str:
    if reference is None:
        return ""
    return f"{100 * (statistics.mean(values) - reference):+.2f}"


def markdown(rows: list[Row], settings: dict[str, Any]) -> str:
    """The section of ``docs/benchmarks.md``: caption, table and figure."""
    lines = ["## Accuracy and robustness", ""]
    if settings["quick"]:
        lines += ["**Smoke run (`--quick`): too small to mean anything.**", ""]
    lines += [
        f"Accuracy of the sentiment example's methods on the {settings['split']} split "
        f"({settings['source']}), and "
        f"accuracy under `RobustAccuracy`'s attack: {settings['steps']}-step PGD in a "
        f"per-example L2 ball on the embedding output, random start, eval mode, "
        f"{settings['batches']}. An example counts as robust when it is classified "
        f"correctly both clean and under attack, so robust accuracy is compared with the "
        f"clean accuracy of the attacked examples, shown next to it (the clean column is "
        f"the whole split). The budget ε of a method is its training budget where it has "
        f"one in this geometry (FGM, PGD, VAT `epsilon`, FreeLB `max_norm`, SMART "
        f"`epsilon` with `norm='l2'`, FGSM and R3F `epsilon` with a relative scale), else "
        f"the FGM config's ({settings['reference']}); Δ "
        f"compares with the no-attack model attacked at the same budget. Means ± standard "
        f"deviation over {settings['seeds']}; target: robust accuracy at ε at least +10 "
        f"points over no attack, clean accuracy not lower.",
        "",
        f"Machine: {settings['machine']}. {settings['load']} Wall time "
        f"{settings['wall'] / 60:.1f} min.",
        "",
        "| method | runs | ε | clean accuracy % | clean % of attacked | robust % at ε "
        "| Δ robust at ε | robust % at 2ε | Δ robust at 2ε | Δ clean | target met |",
        "|---|---:|---|---|---|---|---:|---|---:|---:|---|",
    ]
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "**no**")
        lines.append(
            f"| {row.method} | {row.runs} | {row.budget.describe()} | {_percent(row.accuracy)} "
            f"| {_percent(row.attacked_clean)} | {_percent(row.robust)} "
            f"| {_delta(row.robust, row.baseline_robust)} "
            f"| {_percent(row.robust_double)} "
            f"| {_delta(row.robust_double, row.baseline_robust_double)} "
            f"| {_delta(row.accuracy, row.baseline_accuracy)} | {met} |"
        )
    if settings.get("unchanged"):
        lines += ["", "**Warning:** the attack changed no prediction at any budget above zero; "
                  "robust accuracy equals clean accuracy everywhere. Check that the "
                  "perturbation reaches the final, gradient-free pass of the attack."]
    lines += ["", f"![Clean against robust accuracy per method](img/{FIGURE})", ""]
    return "\n".join(lines)


def plot(rows: list[Row], path: Path, title: str) -> None:
    """Clean accuracy against robust accuracy at ε (filled) and 2ε (open), per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    colours = plt.get_cmap("tab10")
    for index, row in enumerate(rows):
        clean = 100 * statistics.mean(row.accuracy)
        robust = 100 * statistics.mean(row.robust)
        double = 100 * statistics.mean(row.robust_double)
        colour = colours(index % 10)
        label = f"{row.method} (ε={row.budget.describe()})"
        ax.scatter([clean], [robust], color=colour, label=label)
        ax.scatter([clean], [double], facecolors="none", edgecolors=[colour])
        ax.plot([clean, clean], [double, robust], color=colour, linewidth=0.8)
    low, high = ax.get_xlim()
    ax.plot([low, high], [low, high], linestyle=":", color="grey", linewidth=0.8,
            label="robust = clean")
    ax.set_xlabel("clean accuracy %")
    ax.set_ylabel("robust accuracy % (filled: ε, open: 2ε)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Other arguments, e.g. --data.path=reviews.csv, are passed to every training "
               "run (not with --checkpoints).",
    )
    parser.add_argument("--methods", nargs="+", default=None,
                        help="config names in examples/sentiment/configs (default: all)")
    parser.add_argument("--seeds", type=_positive, default=None,
                        help="training seeds 1..n per method (default 3; quick 1)")
    parser.add_argument("--epochs", type=_positive, default=None,
                        help="override trainer.max_epochs")
    parser.add_argument("--max-examples", type=_positive, default=None, help="cap on examples")
    parser.add_argument("--max-length", type=_positive, default=None,
                        help="override data.max_length")
    parser.add_argument("--checkpoints", nargs="+", default=None, metavar="METHOD=PATH",
                        help="evaluate these checkpoints instead of training")
    parser.add_argument("--save-checkpoints", type=Path, default=None,
                        help="keep a checkpoint of every run trained here, in this folder")
    parser.add_argument("--epsilon", type=_non_negative, default=None,
                        help="one attack budget for every method instead of their own")
    parser.add_argument("--epsilon-scale", choices=["absolute", "relative"],
                        default="absolute", help="how --epsilon is read")
    parser.add_argument("--steps", type=_positive, default=None, help="attack steps (default 10)")
    parser.add_argument("--max-batches", type=_positive, default=None,
                        help="test batches attacked per model (default: all)")
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="split to measure on (default test; val to choose configs)")
    parser.add_argument("--jobs", type=_positive, default=1,
                        help="worker processes attacking checkpoints, one CPU thread each")
    parser.add_argument("--results", type=Path, default=None, metavar="DIR",
                        help="keep each checkpoint's scores in DIR and reuse the ones there")
    parser.add_argument("--out", type=Path, default=Path("docs"),
                        help="folder of benchmarks.md and img/ (default: docs)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: two methods, one seed, a tiny model and data set, "
                             "attacked from step 0")
    args, extra = parser.parse_known_args(argv)
    if args.checkpoints:
        training = [flag for flag, value in (
            ("--methods", args.methods), ("--seeds", args.seeds), ("--epochs", args.epochs),
            ("--max-examples", args.max_examples), ("--max-length", args.max_length),
            ("--save-checkpoints", args.save_checkpoints), ("--quick", args.quick or None),
        ) if value is not None] + extra
        if training:
            parser.error(f"{' '.join(training)}: only used when training; with --checkpoints "
                         "each model and its data come from the checkpoint.")
        paths = [item.partition("=")[2] for item in args.checkpoints]
        for item, path in zip(args.checkpoints, paths, strict=True):
            if "=" not in item or not item.partition("=")[0]:
                parser.error(f"--checkpoints takes METHOD=PATH, e.g. fgm=runs/fgm-seed1.ckpt; "
                             f"got {item!r}.")
            if not Path(path).is_file():
                parser.error(f"--checkpoints {item}: no checkpoint file at {path!r}.")
        resolved = [Path(path).resolve() for path in paths]
        twice = sorted({str(p) for p in resolved if resolved.count(p) > 1})
        if twice:
            parser.error(f"--checkpoints lists {', '.join(twice)} more than once; each "
                         "checkpoint counts as one run.")
    return args, extra


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _runs_per_method(results: Sequence[Evaluated]) -> str:
    counts = [sum(r.method == method for r in results) for method in {r.method for r in results}]
    low, high = min(counts), max(counts)
    return f"{low} run(s) per method" if low == high else f"{low}-{high} runs per method"


def _overrides(args: argparse.Namespace, extra: list[str]) -> list[str]:
    quick: dict[str, Any] = QUICK if args.quick else {}
    overrides = list(extra) + list(quick.get("model", []))
    for flag, value in (("--trainer.max_epochs", args.epochs or quick.get("epochs")),
                        ("--data.max_examples", args.max_examples or quick.get("max_examples")),
                        ("--data.max_length", args.max_length or quick.get("max_length"))):
        if value is not None:
            overrides += [flag, str(value)]
    return overrides


def needed_budgets(targets: Sequence[Target]) -> dict[Target, list[Budget]]:
    """The budgets each model is attacked at: its method's budget and twice it; for the
    no-attack models, those of every method."""
    own = {target.method: target.budget for target in targets}
    every = list({b.key: b for base in own.values() for b in (base, base.doubled())}.values())
    return {target: every if target.method == BASELINE else
            [target.budget, target.budget.doubled()] for target in targets}


def _quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "examples.sentiment"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")


def _all_methods(config_dir: Path) -> list[str]:
    names = sorted(path.stem for path in config_dir.glob("*.yaml"))
    return [BASELINE, *(n for n in names if n != BASELINE)] if BASELINE in names else names


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Train or load every model, attack it, write the table and the figure."""
    from examples.sentiment.compare import CONFIG_DIR

    args, extra = parse_args(argv)
    quick: dict[str, Any] = QUICK if args.quick else {}
    steps = args.steps or quick.get("steps") or 10
    max_batches = args.max_batches or quick.get("max_batches")
    _quiet()
    load_before, started = os.getloadavg(), time.perf_counter()
    reference = reference_budget(CONFIG_DIR)
    fixed = None if args.epsilon is None else Budget(args.epsilon, args.epsilon_scale,
                                                     "--epsilon")

    targets: list[Target] = []
    if args.checkpoints:
        for item in args.checkpoints:
            method, _, path = item.partition("=")
            budget = checkpoint_budget(Path(path))
            targets.append(Target(method, Path(path).stem, fixed or budget or reference,
                                  checkpoint=Path(path)))
        source = "checkpoints of earlier runs"
    else:
        methods = args.methods or quick.get("methods") or _all_methods(CONFIG_DIR)
        seeds = range(1, (args.seeds or quick.get("seeds") or 3) + 1)
        overrides = _overrides(args, extra)
        for seed in seeds:
            for method in methods:
                print(f"training {method}, seed {seed} ...", flush=True)
                model, datamodule, budget = train(CONFIG_DIR / f"{method}.yaml", seed,
                                                  overrides, args.save_checkpoints,
                                                  attack_from_start=args.quick)
                targets.append(Target(method, str(seed), fixed or budget or reference,
                                      trained=(model, datamodule)))
        source = "trained here as `examples/sentiment/compare.py` trains them"
        if overrides:
            source += f", with `{' '.join(overrides)}`"

    results = attack_all(targets, needed_budgets(targets), steps, max_batches, args.split,
                         jobs=args.jobs, results=args.results)
    rows = tabulate(results)

    split_name = "test" if args.split == "test" else "validation"
    unchanged = all(
        r.robust[key] == r.robust_clean[key] for r in results for key in r.robust if key[0] > 0
    )
    settings = {
        "quick": args.quick, "source": source, "steps": steps,
        "batches": f"every {split_name} batch" if max_batches is None else
        f"the first {max_batches} {split_name} batch(es) per model",
        "split": split_name,
        "reference": reference.describe(),
        "seeds": _runs_per_method(results),
        "machine": machine_summary(), "load": load_note(load_before, os.getloadavg()),
        "wall": time.perf_counter() - started, "unchanged": unchanged,
    }
    text = markdown(rows, settings)
    write_section(args.out / "benchmarks.md", SECTION, text)
    plot(rows, args.out / "img" / FIGURE, f"Clean and robust {split_name} accuracy per method"
         + (" (smoke run)" if args.quick else ""))
    print(text)
    return rows


if __name__ == "__main__":
    main()
