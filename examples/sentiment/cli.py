"""The LightningCLI program: ``python -m examples.sentiment fit --config ...``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

# Imported for its callbacks: once they are defined, a config can name them by class name
# alone (`class_path: FGM`) as well as by full path (`class_path: lightning_adv.FGM`).
import lightning_adv  # noqa: F401
from examples.sentiment.data import SentimentDataModule
from examples.sentiment.model import SentimentClassifier
from examples.sentiment.plot import plot_run

__all__ = ["SentimentCLI", "main"]

log = logging.getLogger(__name__)


class SentimentCLI(LightningCLI):
    """LightningCLI for :class:`SentimentClassifier` on :class:`SentimentDataModule`.

    The model's vocabulary size, label count, padding id and pretrained folder are linked
    from the data module (known once it has read the data and built its tokenizer), and
    ``model.max_positions`` from ``data.max_length``. After ``fit`` it tests the final
    weights, prints test accuracy and macro-F1, writes them to ``test_metrics.json`` and
    plots the training curves beside the CSV metrics.

    Args:
        *args: passed to :class:`~lightning.pytorch.cli.LightningCLI`.
        **kwargs: passed to :class:`~lightning.pytorch.cli.LightningCLI`.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.max_length", "model.max_positions")
        for source, target in (
            ("data.pretrained_path", "model.pretrained"),
            ("data.vocab_size", "model.vocab_size"),
            ("data.num_labels", "model.num_labels"),
            ("data.pad_token_id", "model.pad_token_id"),
        ):
            parser.link_arguments(source, target, apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit", type=bool, default=True,
            help="Test the final weights after fit and print accuracy and macro-F1.",
        )
        parser.add_argument(
            "--plot_after_fit", type=bool, default=True,
            help="Plot clean vs adversarial training loss and validation scores per epoch.",
        )

    def after_fit(self) -> None:
        options = self.config[self.subcommand]
        # log_dir is broadcast across ranks, so every rank asks for it.
        folder = self.trainer.log_dir if self.trainer.loggers else None
        if options.test_after_fit:
            self._test(folder)
        if options.plot_after_fit and not getattr(self.trainer, "fast_dev_run", False):
            self._plot()

    def _test(self, folder: str | None) -> None:
        results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        metrics = {key: float(value) for key, value in results[0].items()}
        if not self.trainer.is_global_zero:
            return
        accuracy, f1 = 100 * metrics["test/acc"], 100 * metrics["test/f1"]
        count = len(self.datamodule.splits["test"])
        print(f"Test accuracy {accuracy:.2f} %, macro-F1 {f1:.2f} % ({count} test examples)",
              flush=True)
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "test_metrics.json").write_text(
                json.dumps(metrics, indent=1) + "\n", encoding="utf-8"
            )

    def _plot(self) -> None:
        if not self.trainer.is_global_zero:
            return
        csv_logger = next(
            (logger for logger in self.trainer.loggers if isinstance(logger, CSVLogger)), None
        )
        if csv_logger is None:
            log.warning("plot_after_fit needs a CSVLogger in trainer.logger; no plot made.")
            return
        csv_logger.save()
        metrics_csv = Path(csv_logger.log_dir) / "metrics.csv"
        if metrics_csv.is_file():
            print(f"Curves: {plot_run(metrics_csv)}\nMetrics: {metrics_csv}", flush=True)


def _show_info(name: str) -> None:
    """Print INFO records of the example's loggers (the root logger is left alone)."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(args: list[str] | None = None, **kwargs: Any) -> SentimentCLI:
    """Run the CLI; ``args`` replace ``sys.argv[1:]``, ``kwargs`` go to the CLI class."""
    _show_info("examples.sentiment")
    options: dict[str, Any] = {
        "seed_everything_default": 42,
        "save_config_kwargs": {"overwrite": True},
    }
    options.update(kwargs)
    return SentimentCLI(SentimentClassifier, SentimentDataModule, args=args, **options)
