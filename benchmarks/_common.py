"""What the benchmark scripts share: the model, the batch, the methods and the report."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_adv import AWP, FGM, FGSM, PGD, R3F, SMART, VAT, FreeLB

__all__ = [
    "MINILM",
    "QUICK",
    "BenchModule",
    "ExtraPass",
    "Method",
    "ModelSize",
    "build_model",
    "callback_methods",
    "load_note",
    "machine_summary",
    "make_batch",
    "quantiles",
    "quiet_trainer",
    "touched_rows",
    "write_section",
]

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class ModelSize:
    """A BERT classifier's shape and the batch it is timed on."""

    name: str
    vocab_size: int
    hidden_size: int
    layers: int
    heads: int
    intermediate_size: int
    batch_size: int
    seq_len: int

    def describe(self) -> str:
        return (
            f"{self.name}: BERT, {self.layers} layers, hidden {self.hidden_size}, "
            f"{self.heads} heads, intermediate {self.intermediate_size}, vocabulary "
            f"{self.vocab_size:,}, random weights, float32; batch {self.batch_size} x "
            f"{self.seq_len} tokens, no padding"
        )


#: The size of all-MiniLM-L6-v2.
MINILM = ModelSize("MiniLM-L6 size", 30_522, 384, 6, 12, 1536, 32, 64)
#: A model small enough for the tests to run every script in seconds.
QUICK = ModelSize("tiny (quick mode)", 1000, 32, 2, 2, 64, 4, 16)


def build_model(size: ModelSize, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised ``BertForSequenceClassification`` of ``size``, 2 labels."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=size.vocab_size,
        hidden_size=size.hidden_size,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        intermediate_size=size.intermediate_size,
        max_position_embeddings=max(512, size.seq_len),
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def make_batch(size: ModelSize, seed: int = 0) -> Batch:
    """Random token ids (special ids below 1000 avoided when the vocabulary allows)."""
    generator = torch.Generator().manual_seed(seed)
    low = 1000 if size.vocab_size > 2000 else 1
    shape = (size.batch_size, size.seq_len)
    return {
        "input_ids": torch.randint(low, size.vocab_size, shape, generator=generator),
        "attention_mask": torch.ones(shape, dtype=torch.long),
        "labels": torch.randint(0, 2, (size.batch_size,), generator=generator),
    }


def touched_rows(batch: Batch) -> tuple[int, int]:
    """``(distinct ids, positions)`` of a batch: the rows a weight-target attack touches."""
    ids = batch["input_ids"]
    return len(set(ids.reshape(-1).tolist())), int(ids.numel())


class BenchModule(pl.LightningModule):
    """A LightningModule around a classifier, with the side-effect-free loss method the
    callbacks are pointed at (``loss_fn="compute_loss"``), so the clean logits come free.

    Args:
        model: a Hugging Face sequence classifier.
        lr: AdamW learning rate; small, since only the cost of a step matters here.
    """

    def __init__(self, model: torch.nn.Module, lr: float = 1e-5) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def compute_loss(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        out = self.model(**batch)
        return {"loss": out.loss, "logits": out.logits}

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss: Tensor = self.compute_loss(batch, batch_idx)["loss"]
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class ExtraPass(pl.Callback):
    """One more forward and backward of the unperturbed batch on scheduled steps.

    Not an attack: the least any method with one extra pass can cost, measured through the
    same Lightning hook the callbacks use.

    Args:
        start_step: first optimizer step with the extra pass.
        every_n_steps: after ``start_step``, every n-th step gets it.
    """

    def __init__(self, start_step: int = 0, every_n_steps: int = 1) -> None:
        self.start_step = start_step
        self.every_n_steps = every_n_steps
        self.passes = 0
        self._batch: Any = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        offset = trainer.global_step - self.start_step
        scheduled = offset >= 0 and offset % self.every_n_steps == 0
        self._batch = batch if scheduled else None

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._batch is None:
            return
        batch, self._batch = self._batch, None
        loss = pl_module.compute_loss(batch, 0)["loss"]  # type: ignore[operator]
        # A direct backward fires no Lightning hook: no recursion into this method.
        (loss / trainer.accumulate_grad_batches).backward()
        self.passes += 1


@dataclass(frozen=True)
class Method:
    """A callback to measure, with the settings it is measured at.

    Attributes:
        key: short name used on the command line and in tables.
        label: the name shown in tables and figures.
        settings: the arguments, as written in the table.
        build: makes the callback for ``(start_step, every_n_steps)``.
        extra_passes: forward and backward passes it adds, in the paper's terms.
    """

    key: str
    label: str
    settings: str
    build: Callable[[int, int], pl.Callback]
    extra_passes: str


def callback_methods() -> list[Method]:
    """Every callback in the step-time and memory tables, in table order."""
    shared: dict[str, Any] = {"loss_fn": "compute_loss", "warn_on_collapse": False}

    def schedule(start: int, every: int) -> dict[str, Any]:
        return {"start_step": start, "every_n_steps": every, **shared}

    return [
        Method("extra", "one extra pass (no attack)", "forward + backward of the clean batch",
               lambda s, e: ExtraPass(s, e), "1 full"),
        Method("fgm", "FGM", "epsilon=1.0, target=weight",
               lambda s, e: FGM(epsilon=1.0, target="weight", **schedule(s, e)), "1 full"),
        Method("fgm_output", "FGM (output)", "epsilon=1.0, target=output",
               lambda s, e: FGM(epsilon=1.0, target="output", **schedule(s, e)), "1 full"),
        Method("fgsm", "FGSM", "epsilon=1e-3, target=weight",
               lambda s, e: FGSM(epsilon=1e-3, **schedule(s, e)), "1 full"),
        Method("pgd", "PGD", "epsilon=1.0, alpha=0.3, steps=3, target=weight",
               lambda s, e: PGD(epsilon=1.0, alpha=0.3, steps=3, **schedule(s, e)),
               "2 partial + 1 full"),
        Method("freelb", "FreeLB", "steps=3 (defaults)",
               lambda s, e: FreeLB(steps=3, **schedule(s, e)), "3 full"),
        Method("smart", "SMART", "steps=1 (defaults)",
               lambda s, e: SMART(steps=1, **schedule(s, e)), "1 partial + 1 full"),
        Method("vat", "VAT", "power_iterations=1 (defaults)",
               lambda s, e: VAT(**schedule(s, e)), "1 partial + 1 full"),
        Method("r3f", "R3F", "epsilon=1e-5 (defaults)",
               lambda s, e: R3F(**schedule(s, e)), "1 full"),
        Method("awp", "AWP", "adv_lr=1.0, adv_epsilon=0.01, steps=1",
               lambda s, e: AWP(**schedule(s, e)), "1 full"),
    ]


def quiet_trainer(callbacks: Sequence[pl.Callback], max_steps: int,
                  precision: str = "32-true") -> pl.Trainer:
    """A CPU Trainer with no logger, checkpoint, progress bar, summary or validation."""
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1,
        callbacks=list(callbacks), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, precision=precision,  # type: ignore[arg-type]
    )


def quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    """``(25th percentile, median, 75th percentile)``; all three equal for one value."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def machine_summary() -> str:
    """Platform, CPU count and library versions, for table captions."""
    import lightning
    import transformers

    return (
        f"`{platform.platform()}`, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}, lightning "
        f"{lightning.__version__}, transformers {transformers.__version__}"
    )


def load_note(before: tuple[float, float, float], after: tuple[float, float, float]) -> str:
    """A sentence on the machine's load average during a measurement."""
    cpus = os.cpu_count() or 1
    text = (
        f"Load average (1, 5, 15 min) {before[0]:.1f} / {before[1]:.1f} / {before[2]:.1f} at "
        f"the start and {after[0]:.1f} / {after[1]:.1f} / {after[2]:.1f} at the end (the "
        "end includes the measurement's own load)."
    )
    # Only the start tells of other jobs: by the end the measurement loads the machine too.
    if before[0] > 0.5 * cpus:
        text += (
            " **Measured with other load present** on the machine: times are longer and "
            "noisier than on an idle machine."
        )
    return text


DOC_HEADER = """\
# Benchmarks

What the adversarial training callbacks cost in time and memory, and what they buy in
robustness. Each section is written by a script in `benchmarks/` (run them all with
`make bench`); a re-run replaces only its own section.
"""


def write_section(doc: Path, name: str, body: str) -> None:
    """Put ``body`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``doc``.

    The markers are added at the end when missing; the rest of the file is kept.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = doc.read_text(encoding="utf-8") if doc.exists() else DOC_HEADER
    if start in text and end in text and text.index(start) < text.index(end):
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text, encoding="utf-8")


def base_parser(doc: str | None, quick_help: str) -> argparse.ArgumentParser:
    """The arguments every benchmark takes: ``--quick``, ``--out`` and ``--threads``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else "")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=Path("docs"),
                        help="folder of benchmarks.md and img/ (default: docs)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    return parser


def save_figure(fig: Any, ax: Any, path: Path, title: str) -> None:
    """Title and legend as every benchmark figure has them; write ``path`` and close."""
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
