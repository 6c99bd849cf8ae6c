"""Carve a validation split out of the training split, for tuning without touching the test classes.

By classes when the test classes are unseen at training (CUB, Cars, SOP, In-shop,
folders with a class split): some training classes are held out whole, which is
what the test measures. By images when train and test share their classes
(Fashion-MNIST): some images of every training class are held out.
The choice is seeded and independent of the training seed, so every run of a
sweep validates on the same images.
"""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict

from catalog.records import ImageRecord
from core.errors import UserValueError

VALIDATION_SPLIT = "val"
EVALUATED_SPLITS = ("test", "query", "gallery")


def carve_validation(
    records: list[ImageRecord], fraction: float, *, by: str = "auto", seed: int = 0
) -> list[ImageRecord]:
    """``records`` with about ``fraction`` of the training split moved to a "val" split.

    ``by``: "classes", "images", or "auto" (images when a training class also
    appears in a test, query or gallery split, classes otherwise). Each class
    keeps at least two training images and each held-out class at least two
    validation images, so both sides can form positive pairs.
    """
    if not 0.0 < fraction < 1.0:
        raise UserValueError(f"validation fraction must be between 0 and 1 (exclusive), got {fraction}")
    if by not in ("auto", "classes", "images"):
        raise UserValueError(f"validation by must be auto, classes or images, not {by!r}")
    by_class: dict[str, list[int]] = defaultdict(list)
    for position, record in enumerate(records):
        if record.split == "train":
            by_class[record.label].append(position)
    if by == "auto":
        evaluated = {r.label for r in records if r.split in EVALUATED_SPLITS}
        by = "images" if evaluated & set(by_class) else "classes"
    rng = random.Random(f"validation-{seed}")
    held_out = _by_classes(by_class, fraction, rng) if by == "classes" else _by_images(by_class, fraction, rng)
    if not held_out:
        raise UserValueError(
            f"a validation fraction of {fraction} by {by} holds out nothing: "
            f"the training split has {len(by_class)} classes"
        )
    return [dataclasses.replace(r, split=VALIDATION_SPLIT) if i in held_out else r for i, r in enumerate(records)]


def _by_classes(by_class: dict[str, list[int]], fraction: float, rng: random.Random) -> set[int]:
    eligible = sorted(label for label, members in by_class.items() if len(members) >= 2)
    if len(eligible) < 2:
        raise UserValueError(
            f"cannot hold out classes for validation: only {len(eligible)} training class(es) "
            "with two or more images"
        )
    count = min(max(1, round(fraction * len(eligible))), len(eligible) - 1)
    chosen = rng.sample(eligible, count)
    return {i for label in chosen for i in by_class[label]}


def _by_images(by_class: dict[str, list[int]], fraction: float, rng: random.Random) -> set[int]:
    held_out: set[int] = set()
    for label in sorted(by_class):
        members = list(by_class[label])
        count = round(fraction * len(members))
        if count < 2 or len(members) - count < 2:
            continue
        rng.shuffle(members)
        held_out.update(members[:count])
    return held_out
