"""``SentimentClassifier``: a Hugging Face sequence classifier as a LightningModule."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import AutoModelForSequenceClassification, BertConfig, PreTrainedModel

__all__ = ["SentimentClassifier"]

Batch = dict[str, Tensor]


class SentimentClassifier(pl.LightningModule):
    """Text classification with ``AutoModelForSequenceClassification``.

    The network is loaded from a local pretrained folder, or built from scratch as a small
    BERT for a character vocabulary. :meth:`compute_loss` has no side effects (no logging,
    no metric update), so an adversarial callback may call it again for its extra passes;
    pass ``loss_fn="compute_loss"`` to the callback, which manual optimization requires.

    Args:
        pretrained: local folder of a pretrained model; ``None`` builds a new BERT from the
            size arguments below (the CLI links it to the data module's tokenizer).
        vocab_size: vocabulary size of a new model (linked from the data module).
        num_labels: number of classes (linked from the data module).
        pad_token_id: padding id of the tokenizer (linked from the data module).
        max_positions: position embeddings of a new model (linked to ``max_length``).
        hidden_size: width of a new model.
        num_layers: transformer layers of a new model.
        num_heads: attention heads of a new model.
        intermediate_size: feed-forward width of a new model.
        dropout: dropout of a new model (a pretrained model keeps its own).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay, not applied to biases and LayerNorm weights.
        warmup_ratio: share of the optimizer steps spent warming the learning rate up
            linearly; it then decays linearly to zero.
        automatic_optimization: ``False`` makes :meth:`training_step` do its own backward
            and optimizer step (manual optimization).

    Example::

        model = SentimentClassifier(vocab_size=5000, num_labels=2)
        out = model.compute_loss(batch, 0)  # {"loss": ..., "logits": ...}
    """

    def __init__(
        self,
        pretrained: str | None = None,
        vocab_size: int = 8000,
        num_labels: int = 2,
        pad_token_id: int = 0,
        max_positions: int = 512,
        hidden_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 2,
        intermediate_size: int = 512,
        dropout: float = 0.1,
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        automatic_optimization: bool = True,
    ) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"SentimentClassifier needs num_labels >= 2, got {num_labels}.")
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"`warmup_ratio` must lie in [0, 1), got {warmup_ratio}.")
        self.save_hyperparameters()
        self.automatic_optimization = automatic_optimization
        self.model = _build_network(
            pretrained, vocab_size, num_labels, pad_token_id, max_positions, hidden_size,
            num_layers, num_heads, intermediate_size, dropout,
        )
        self.val_accuracy = MulticlassAccuracy(num_labels, average="micro")
        self.val_f1 = MulticlassF1Score(num_labels, average="macro")
        self.test_accuracy = MulticlassAccuracy(num_labels, average="micro")
        self.test_f1 = MulticlassF1Score(num_labels, average="macro")
        self._test_predictions: list[Tensor] = []
        #: Predicted label ids of the last test run, in test-set order.
        self.test_predictions: Tensor | None = None

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        logits: Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits

    def compute_loss(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """Cross-entropy and logits of a batch; no logging, no metric update."""
        out = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        return {"loss": out.loss, "logits": out.logits}

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = self.compute_loss(batch, batch_idx)["loss"]
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()  # type: ignore[union-attr]
            self.manual_backward(loss)
            optimizer.step()  # type: ignore[union-attr]
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()  # type: ignore[union-attr]
            loss = loss.detach()
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        out = self.compute_loss(batch, batch_idx)
        predictions = out["logits"].argmax(dim=-1)
        self.val_accuracy.update(predictions, batch["labels"])
        self.val_f1.update(predictions, batch["labels"])
        self.log("val/loss", out["loss"], on_epoch=True, prog_bar=False)
        self.log("val/acc", self.val_accuracy, on_epoch=True, prog_bar=True)
        self.log("val/f1", self.val_f1, on_epoch=True)

    def on_test_epoch_start(self) -> None:
        self._test_predictions = []

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        out = self.compute_loss(batch, batch_idx)
        predictions = out["logits"].argmax(dim=-1)
        self._test_predictions.append(predictions.detach().cpu())
        self.test_accuracy.update(predictions, batch["labels"])
        self.test_f1.update(predictions, batch["labels"])
        self.log("test/loss", out["loss"], on_epoch=True)
        self.log("test/acc", self.test_accuracy, on_epoch=True)
        self.log("test/f1", self.test_f1, on_epoch=True)

    def on_test_epoch_end(self) -> None:
        if self._test_predictions:
            self.test_predictions = torch.cat(self._test_predictions)

    def configure_optimizers(self) -> Any:
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams["weight_decay"]},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams["lr"],
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.hparams["warmup_ratio"] * total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler,
                                                         "interval": "step"}}


def _build_network(pretrained: str | None, vocab_size: int, num_labels: int,
                   pad_token_id: int, max_positions: int, hidden_size: int, num_layers: int,
                   num_heads: int, intermediate_size: int, dropout: float) -> PreTrainedModel:
    if pretrained is not None:
        if not os.path.isdir(pretrained):
            raise FileNotFoundError(
                f"Pretrained model folder {pretrained!r} does not exist. Pass a local folder "
                "with config.json and the weights; models are never downloaded here."
            )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        network: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(
            pretrained, num_labels=num_labels, local_files_only=True
        )
        # from_pretrained returns eval mode, and Lightning keeps the mode a module has at
        # fit start: without this, a fine-tuned model would train without dropout.
        network.train()
        config = network.config
        rank_zero_info(
            f"Loaded the pretrained {config.model_type} in {os.path.basename(pretrained)!r} "
            f"({config.num_hidden_layers} layers, hidden {config.hidden_size}): "
            "`model.hidden_size`, `num_layers`, `num_heads`, `intermediate_size` and "
            "`dropout` apply to models built from scratch only, and are not used."
        )
        return network
    if hidden_size % num_heads:
        raise ValueError(
            f"`hidden_size` ({hidden_size}) must be a multiple of `num_heads` ({num_heads})."
        )
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=pad_token_id,
    )
    config.num_labels = num_labels
    built: PreTrainedModel = AutoModelForSequenceClassification.from_config(config)
    return built
