"""The training loader's prefetched batches fit in /dev/shm: the prefetch factor is lowered to what the free space
holds, and a loader that cannot fit even one batch per worker is refused naming the sizes (disk_usage mocked)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core.errors import UserValueError
from tests.test_training_trainer import _config, _images
from training.trainer import Trainer, fitting_prefetch_factor, training_loader

MiB = 2**20


@pytest.fixture
def shm_free(monkeypatch):
    """``shm_free(n)``: shutil.disk_usage reports ``n`` bytes free, and records the paths it was asked about."""
    asked: list[str] = []

    def pretend(free: int) -> list[str]:
        def disk_usage(path):
            asked.append(str(path))
            return SimpleNamespace(total=free, used=0, free=free)

        monkeypatch.setattr(shutil, "disk_usage", disk_usage)
        return asked

    return pretend


def test_the_full_prefetch_factor_when_shared_memory_holds_it(shm_free) -> None:
    asked = shm_free(160 * MiB)  # 4 workers × 4 batches × 10 MiB, exactly
    assert fitting_prefetch_factor(10 * MiB, 4) == (4, None)
    assert asked == ["/dev/shm"]


@pytest.mark.parametrize(
    ("free_mib", "processes", "expected"), [(159, 1, 3), (100, 1, 2), (80, 1, 2), (79, 1, 1), (100, 2, 1)]
)
def test_the_prefetch_factor_is_lowered_to_what_fits_and_said(
    shm_free, free_mib: int, processes: int, expected: int
) -> None:
    shm_free(free_mib * MiB)
    factor, note = fitting_prefetch_factor(10 * MiB, 4, processes=processes)
    assert factor == expected == (free_mib // (10 * 4 * processes))
    assert note.startswith(f"note: {expected} batch(es) prefetched per loader worker, not 4:")
    assert (
        f"{40 * processes:.1f} MiB a prefetched batch each" in note and f"{free_mib:.1f} MiB free in /dev/shm" in note
    )


def test_a_loader_that_cannot_fit_one_batch_per_worker_is_refused_naming_the_sizes(shm_free) -> None:
    shm_free(39 * MiB)
    with pytest.raises(UserValueError) as error:
        fitting_prefetch_factor(10 * MiB, 4)
    assert "1 process(es) × 4 loader worker(s) × 10.0 MiB a batch = 40.0 MiB" in str(error.value)
    assert "39.0 MiB free in /dev/shm" in str(error.value) and "--shm-size" in str(error.value)


def test_without_dev_shm_nothing_is_checked(monkeypatch) -> None:
    def missing(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr(shutil, "disk_usage", missing)
    assert fitting_prefetch_factor(10 * MiB, 4) == (4, None)


def test_the_training_loader_prefetches_what_fits(tmp_path: Path, shm_free, capsys) -> None:
    data = _images(tmp_path / "data")
    config = _config(data, tmp_path / "run", epochs=1, eval_every=0, workers=2)
    trainer = Trainer(config, progress=False)
    batch_bytes = config.batch_size * 3 * config.image_size**2  # uint8 [B, 3, H, W]
    shm_free(2 * 4 * batch_bytes)
    assert training_loader(trainer.dataset, trainer.sampler, config, torch.device("cpu")).prefetch_factor == 4
    shm_free(2 * 2 * batch_bytes)  # 2 workers × 2 batches
    assert training_loader(trainer.dataset, trainer.sampler, config, torch.device("cpu")).prefetch_factor == 2
    assert "note: 2 batch(es) prefetched per loader worker, not 4" in capsys.readouterr().out
    shm_free(2 * batch_bytes - 1)
    with pytest.raises(UserValueError, match="does not fit in shared memory"):
        training_loader(trainer.dataset, trainer.sampler, config, torch.device("cpu"))
