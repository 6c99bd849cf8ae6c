"""A validation split carved from the training classes never touches the test split."""

from __future__ import annotations

from collections import Counter

import pytest

from catalog import ImageRecord, carve_validation


def _records(train_classes: int, per_class: int, *, test_shares_classes: bool) -> list[ImageRecord]:
    records = [
        ImageRecord(f"train/{c}/{i}.png", f"c{c}", "train") for c in range(train_classes) for i in range(per_class)
    ]
    test_labels = [f"c{c}" for c in range(3)] if test_shares_classes else ["t0", "t1", "t2"]
    records += [ImageRecord(f"test/{label}/{i}.png", label, "test") for label in test_labels for i in range(4)]
    return records


def test_by_classes_holds_out_whole_training_classes() -> None:
    records = _records(10, 5, test_shares_classes=False)
    carved = carve_validation(records, 0.3)  # auto: test classes are unseen, so by classes
    val_labels = {r.label for r in carved if r.split == "val"}
    train_labels = {r.label for r in carved if r.split == "train"}
    assert len(val_labels) == 3 and not val_labels & train_labels
    assert all(r.label.startswith("c") for r in carved if r.split == "val")
    assert [r for r in carved if r.split == "test"] == [r for r in records if r.split == "test"]
    assert len(carved) == len(records) and {r.path for r in carved} == {r.path for r in records}


def test_by_images_keeps_every_class_on_both_sides() -> None:
    records = _records(4, 20, test_shares_classes=True)
    carved = carve_validation(records, 0.25)  # auto: test shares the classes, so by images
    val = Counter(r.label for r in carved if r.split == "val")
    train = Counter(r.label for r in carved if r.split == "train")
    assert val == {f"c{c}": 5 for c in range(4)} and train == {f"c{c}": 15 for c in range(4)}
    assert not any(r.path.startswith("test/") for r in carved if r.split == "val")


def test_the_carving_is_seeded_and_independent_of_order_of_calls() -> None:
    records = _records(12, 6, test_shares_classes=False)
    first = carve_validation(records, 0.25, seed=0)
    assert first == carve_validation(records, 0.25, seed=0)
    assert first != carve_validation(records, 0.25, seed=1)


def test_small_classes_stay_whole_for_training() -> None:
    records = _records(3, 3, test_shares_classes=True)  # 3 images: holding out 2 would leave 1
    with pytest.raises(ValueError, match="holds out nothing"):
        carve_validation(records, 0.5, by="images")


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_bad_fractions_name_the_value(fraction: float) -> None:
    with pytest.raises(ValueError, match=str(fraction)):
        carve_validation(_records(4, 4, test_shares_classes=False), fraction)


def test_bad_mode_is_named() -> None:
    with pytest.raises(ValueError, match="'pixels'"):
        carve_validation(_records(4, 4, test_shares_classes=False), 0.5, by="pixels")
