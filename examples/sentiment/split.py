"""Label ids, a seeded stratified split, and a stratified cap on the number of examples."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

__all__ = ["check_labels_in_training", "label_names", "stratified_cap", "stratified_split"]


def label_names(labels: Sequence[str]) -> list[str]:
    """The distinct labels in id order: numeric order if every label is an integer."""
    distinct = set(labels)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _by_label(labels: Sequence[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    return dict(sorted(groups.items()))


def stratified_split(
    labels: Sequence[int], fractions: Sequence[float], seed: int
) -> list[list[int]]:
    """Split indices into parts (e.g. validation, test, train) keeping label proportions.

    Each label's indices are shuffled with ``seed``; part ``k`` takes
    ``round(n * fractions[k])`` of them and the last part takes the rest, so the last
    part should be the training split. Indices inside each part are sorted.

    Args:
        labels: label id of every example.
        fractions: share of every part but the last; they must sum to less than 1.
        seed: seed of the shuffle; the same labels and seed give the same split.
    """
    if any(f < 0 for f in fractions) or sum(fractions) >= 1:
        raise ValueError(
            f"Split fractions must be >= 0 and sum to less than 1 (the rest is training), "
            f"got {list(fractions)}."
        )
    rng = random.Random(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for indices in _by_label(labels).values():
        shuffled = list(indices)
        rng.shuffle(shuffled)
        start = 0
        for k, fraction in enumerate(fractions):
            count = min(_round_half_up(len(shuffled) * fraction), len(shuffled) - start)
            parts[k].extend(shuffled[start:start + count])
            start += count
        parts[-1].extend(shuffled[start:])
    return [sorted(part) for part in parts]


def stratified_cap(labels: Sequence[int], limit: int, seed: int) -> list[int]:
    """At most ``limit`` indices, each label keeping its share (largest remainders)."""
    if limit >= len(labels):
        return list(range(len(labels)))
    groups = _by_label(labels)
    quotas = {label: len(group) * limit / len(labels) for label, group in groups.items()}
    counts = {label: math.floor(quota) for label, quota in quotas.items()}
    by_remainder = sorted(groups, key=lambda label: (counts[label] - quotas[label], label))
    for label in by_remainder[: limit - sum(counts.values())]:
        counts[label] += 1

    rng = random.Random(seed)
    chosen: list[int] = []
    for label, group in groups.items():
        chosen.extend(rng.sample(group, counts[label]))
    return sorted(chosen)


def check_labels_in_training(names: Sequence[str], train: Sequence[int],
                             held_out: dict[str, Sequence[int]]) -> None:
    """Raise if a validation or test label never occurs in the training split.

    Args:
        names: label names, indexed by id.
        train: label ids of the training split.
        held_out: label ids of each held-out split, by split name.
    """
    seen = set(train)
    for split, labels in held_out.items():
        missing = Counter(label for label in labels if label not in seen)
        if missing:
            listing = ", ".join(
                f"{names[label]!r} ({count} examples)" for label, count in sorted(missing.items())
            )
            raise ValueError(
                f"Label {listing} occurs only in the {split} split, never in training, so the "
                "model cannot learn it. Add training examples with that label, remove its "
                "examples, or raise `max_examples` or lower `val_fraction`/`test_fraction`."
            )
