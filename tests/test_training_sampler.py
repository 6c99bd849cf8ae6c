from __future__ import annotations

from collections import Counter

import pytest

from training.sampler import PKBatchSampler


def _labels() -> list[int]:
    # class 3 has a single image, class 4 has three: both need care with K = 4
    return [0] * 10 + [1] * 7 + [2] * 5 + [3] * 1 + [4] * 3 + [5] * 8


@pytest.mark.parametrize("p,k", [(3, 2), (2, 4), (6, 2)])
def test_every_batch_is_p_classes_times_k_images(p: int, k: int) -> None:
    labels = _labels()
    sampler = PKBatchSampler(labels, p, k, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(labels) // (p * k)
    for batch in batches:
        per_class = Counter(labels[i] for i in batch)
        assert len(per_class) == p
        assert set(per_class.values()) == {k}
        for cls in per_class:
            members = [i for i in batch if labels[i] == cls]
            if labels.count(cls) >= k:
                assert len(set(members)) == k  # no repeats when the class has enough images


def test_deterministic_under_seed_and_epoch() -> None:
    labels = _labels()
    assert_deterministic_under_seed_and_epoch(lambda seed: PKBatchSampler(labels, 3, 2, seed=seed))


def assert_deterministic_under_seed_and_epoch(make) -> None:
    """Same (seed, epoch): same batches; another seed or epoch: other batches. ``make(seed)`` builds a sampler."""
    first, second, other_seed = (make(s) for s in (7, 7, 8))
    assert list(first) == list(second)
    assert list(first) != list(other_seed)
    first.set_epoch(1)
    second.set_epoch(1)
    assert list(first) == list(second)
    second.set_epoch(0)
    assert list(first) != list(second)


def test_images_are_dealt_before_any_repeats() -> None:
    labels = [c for c in range(4) for _ in range(6)]
    sampler = PKBatchSampler(labels, 2, 2, seed=0)
    seen = [i for batch in sampler for i in batch]
    assert len(seen) == len(set(seen)) == len(labels)  # one epoch = every image exactly once here


def test_rejects_more_classes_per_batch_than_exist() -> None:
    with pytest.raises(ValueError, match="needs at least that many classes"):
        PKBatchSampler([0, 0, 1, 1], 3, 2)
