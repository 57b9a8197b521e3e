"""Tiny models, modules and data shared by the tests."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

VOCAB = 50
PAD = 0

# A LightningCLI config head for a quiet CPU trainer. No `seed_everything`: the CLI would
# otherwise reseed the global generator of the test run.
QUIET_TRAINER_YAML = """\
seed_everything: false
trainer:
  accelerator: cpu
  devices: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
"""


def tiny_bert(seed: int = 0, dropout: float = 0.0, dtype: torch.dtype = torch.float64,
              hidden: int = 16, layers: int = 1, labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=labels,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, pad_token_id=PAD,
    )
    model = BertForSequenceClassification(config).to(dtype)
    # Random init gives small embedding gradients; larger weights make the attack matter.
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.normal_(0.0, 0.5)
    return model


def make_batches(n: int, batch_size: int = 4, seq_len: int = 7, seed: int = 1,
                 labels: int = 3) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (batch_size, seq_len), generator=generator)
        lengths = torch.randint(3, seq_len + 1, (batch_size,), generator=generator)
        mask = torch.arange(seq_len)[None, :] < lengths[:, None]
        ids = ids.masked_fill(~mask, PAD)
        ids[:, 1] = ids[0, 2]  # a token shared by every example: duplicated rows
        batches.append({
            "input_ids": ids,
            "attention_mask": mask.long(),
            "labels": torch.randint(0, labels, (batch_size,), generator=generator),
        })
    return batches


def loader(batches: list[dict[str, Tensor]]) -> DataLoader[Any]:
    return DataLoader(batches, batch_size=None, shuffle=False)


class Classifier(pl.LightningModule):
    """A LightningModule around a Hugging Face classifier; logs its clean loss."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.0, optimizer: str = "sgd") -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.optimizer_name = optimizer
        self.training_step_calls = 0

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self.training_step_calls += 1
        loss = self.model(**batch).loss
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def compute_loss(self, batch: dict[str, Tensor], batch_idx: int) -> Any:
        out = self.model(**batch)
        return {"loss": out.loss, "logits": out.logits}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ManualClassifier(Classifier):
    """Manual optimization: ``training_step`` does its own backward and step."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.0) -> None:
        super().__init__(model, lr)
        self.automatic_optimization = False

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        loss = self.compute_loss(batch, batch_idx)["loss"]
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss.detach()


class GradRecorder(pl.Callback):
    """Keeps a copy of every parameter's ``.grad`` as the optimizer is about to step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, Tensor | None]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        self.grads.append({
            name: None if p.grad is None else p.grad.detach().clone()
            for name, p in pl_module.named_parameters()
        })


def trainer(callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, max_epochs=1,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def clone(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)


def attack_and_capture(attack: Any, step: Any) -> Tensor | None:
    """Run ``attack(step)`` and return the last perturbation it applied.

    One-step methods hand their perturbation over with ``backward_at(r, release=True)``,
    after which its memory holds the weight backup; the copy is taken before that.
    """
    released: list[Tensor] = []
    original = step.backward_at

    def backward_at(r: Tensor | None, release: bool = False) -> Tensor:
        if release and r is not None:
            released.append(r.detach().clone())
        return original(r, release)  # type: ignore[no-any-return]

    step.backward_at = backward_at
    attack(step)
    if step.perturbation is not None:
        return step.perturbation  # type: ignore[no-any-return]
    return released[-1] if released else None
