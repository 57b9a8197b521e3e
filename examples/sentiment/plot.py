"""Training curves of one run from its CSVLogger ``metrics.csv``.

Usage::

    python -m examples.sentiment.plot runs/sentiment/fgm/version_0/metrics.csv
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["EpochCurves", "epoch_curves", "plot_run"]

CLEAN_LOSS = "train/loss_step"
VAL_ACCURACY = "val/acc"
VAL_F1 = "val/f1"


@dataclass
class EpochCurves:
    """Per-epoch means of the logged training losses and the validation scores.

    Args:
        clean_loss: mean clean training loss over the logged steps of each epoch.
        adversarial_loss: mean adversarial loss over the same steps, per attack (its
            log prefix, e.g. ``"fgm"``).
        val_accuracy: validation accuracy at the end of each epoch.
        val_f1: validation macro-F1 at the end of each epoch.
        clean_steps: ``(epoch position, loss)`` of every logged step; 0.5 is mid-epoch 0.
        adversarial_steps: the same for the adversarial loss, per attack.
    """

    clean_loss: dict[int, float]
    adversarial_loss: dict[str, dict[int, float]]
    val_accuracy: dict[int, float]
    val_f1: dict[int, float]
    clean_steps: list[tuple[float, float]] = field(default_factory=list)
    adversarial_steps: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


def _number(value: str | None) -> float | None:
    if value is None or value == "":
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def epoch_curves(metrics_csv: str | Path) -> EpochCurves:
    """Read ``metrics.csv`` of a CSVLogger into per-epoch curves."""
    with open(metrics_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns = list(rows[0]) if rows else []
    adversarial_columns = [c for c in columns if c.endswith("/adv_loss")]

    clean: dict[int, list[float]] = defaultdict(list)
    adversarial: dict[str, dict[int, list[float]]] = {
        c.split("/")[0]: defaultdict(list) for c in adversarial_columns
    }
    accuracy: dict[int, float] = {}
    f1: dict[int, float] = {}
    clean_steps: list[tuple[float, float]] = []
    adversarial_steps: dict[str, list[tuple[float, float]]] = {name: [] for name in adversarial}
    steps_per_epoch = _steps_per_epoch(rows)
    for row in rows:
        epoch_value, step = _number(row.get("epoch")), _number(row.get("step"))
        if epoch_value is None:
            continue
        epoch = int(epoch_value)
        position = (step + 1) / steps_per_epoch if step is not None else epoch + 0.5
        loss = _number(row.get(CLEAN_LOSS))
        if loss is not None:
            clean[epoch].append(loss)
            clean_steps.append((position, loss))
        for column in adversarial_columns:
            value = _number(row.get(column))
            if value is not None:
                adversarial[column.split("/")[0]][epoch].append(value)
                adversarial_steps[column.split("/")[0]].append((position, value))
        for key, target in ((VAL_ACCURACY, accuracy), (VAL_F1, f1)):
            value = _number(row.get(key))
            if value is not None:
                target[epoch] = value
    return EpochCurves(
        clean_loss={epoch: _mean(values) for epoch, values in sorted(clean.items())},
        adversarial_loss={
            name: {epoch: _mean(values) for epoch, values in sorted(per_epoch.items())}
            for name, per_epoch in adversarial.items()
        },
        val_accuracy=dict(sorted(accuracy.items())),
        val_f1=dict(sorted(f1.items())),
        clean_steps=clean_steps,
        adversarial_steps=adversarial_steps,
    )


def _steps_per_epoch(rows: list[dict[str, str]]) -> float:
    """Optimizer steps in epoch 0: the step of its epoch-end rows, else its last logged step."""
    steps = [_number(row.get("step")) for row in rows if _number(row.get("epoch")) == 0]
    known = [step for step in steps if step is not None]
    return max(known) + 1 if known else 1.0


def plot_run(metrics_csv: str | Path, output: str | Path | None = None,
             title: str | None = None) -> Path:
    """Plot clean vs adversarial training loss and validation scores per epoch.

    Args:
        metrics_csv: the ``metrics.csv`` written by a CSVLogger.
        output: the PNG to write; ``curves.png`` beside ``metrics_csv`` if None.
        title: figure title; the run folder's name if None.

    Returns:
        The path of the PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    source = Path(metrics_csv)
    target = Path(output) if output is not None else source.with_name("curves.png")
    curves = epoch_curves(source)
    figure, (loss_axes, score_axes) = plt.subplots(1, 2, figsize=(11, 4))

    # Thin lines: logged steps. Markers: epoch means, drawn mid-epoch (epoch 0 spans 0-1).
    series = [("clean", "C0", curves.clean_steps, curves.clean_loss)]
    series += [(f"adversarial ({name})", f"C{i + 1}", curves.adversarial_steps[name], per_epoch)
               for i, (name, per_epoch) in enumerate(curves.adversarial_loss.items())]
    for label, color, steps, per_epoch in series:
        if steps:
            loss_axes.plot(*zip(*steps, strict=True), color=color, alpha=0.3, linewidth=0.8)
        if per_epoch:
            loss_axes.plot([e + 0.5 for e in per_epoch], list(per_epoch.values()), "o-",
                           color=color, label=f"{label}, epoch mean")
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("cross-entropy")
    loss_axes.set_title("training loss")
    loss_axes.legend()
    loss_axes.grid(alpha=0.3)

    # Validation runs at the end of each epoch: epoch 0 ends at 1.
    for label, per_epoch in (("accuracy", curves.val_accuracy), ("macro-F1", curves.val_f1)):
        if per_epoch:
            epochs = [e + 1 for e in per_epoch]
            score_axes.plot(epochs, [100 * v for v in per_epoch.values()], "o-", label=label)
    score_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    score_axes.set_xlabel("epoch")
    score_axes.set_ylabel("%")
    score_axes.set_title("validation, end of epoch")
    score_axes.legend()
    score_axes.grid(alpha=0.3)

    figure.suptitle(title or f"{source.parent.parent.name} / {source.parent.name}")
    figure.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics_csv", help="metrics.csv written by the CSVLogger")
    parser.add_argument("--output", default=None, help="PNG path (default: curves.png beside)")
    args = parser.parse_args(argv)
    print(plot_run(args.metrics_csv, args.output))


if __name__ == "__main__":
    main()
