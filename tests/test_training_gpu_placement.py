"""Which GPU and process-group backend each torchrun process gets (CUDA counts mocked, nothing runs on a GPU), and
train()'s teardown: the process group is destroyed after a successful run only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import training.trainer as trainer_module
from core.errors import UserValueError
from training import distributed
from training.config import resolve_config


@pytest.fixture
def gpus(monkeypatch):
    """Pretend torch sees ``n`` CUDA GPUs: ``gpus(n)``."""

    def pretend(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)

    return pretend


def _torchrun(monkeypatch, local_rank: int, local_world_size: int) -> None:
    for name, value in dict(
        RANK=local_rank, WORLD_SIZE=local_world_size, LOCAL_RANK=local_rank, LOCAL_WORLD_SIZE=local_world_size
    ).items():
        monkeypatch.setenv(name, str(value))


@pytest.mark.parametrize(
    ("gpu_count", "local_rank", "share", "expected"),
    [(1, 1, False, 1), (1, 1, True, 0), (2, 3, True, 1), (4, 3, True, 3), (0, 1, True, 1)],
)
def test_a_process_s_gpu_is_its_local_rank_or_with_share_gpus_that_modulo_the_gpus(
    monkeypatch, gpus, gpu_count: int, local_rank: int, share: bool, expected: int
) -> None:
    gpus(gpu_count)
    _torchrun(monkeypatch, local_rank, 2)
    assert distributed.gpu_index(share) == expected


def test_processes_share_a_gpu_only_when_asked_on_cuda_with_more_processes_than_gpus(monkeypatch, gpus) -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    _torchrun(monkeypatch, 0, 2)
    gpus(1)
    assert distributed.shares_a_gpu(cuda, True)
    assert not distributed.shares_a_gpu(cuda, False) and not distributed.shares_a_gpu(cpu, True)
    gpus(2)
    assert not distributed.shares_a_gpu(cuda, True)


def test_shared_gpus_talk_over_gloo_and_nccl_is_refused_for_them() -> None:
    cuda = torch.device("cuda", 0)
    assert distributed.choose_backend("auto", cuda) == "nccl"  # the multi-GPU default is unchanged
    assert distributed.choose_backend("auto", cuda, shared_gpu=True) == "gloo"
    assert distributed.choose_backend("gloo", cuda, shared_gpu=True) == "gloo"
    with pytest.raises(ValueError, match="nccl cannot run two processes on one GPU"):
        distributed.choose_backend("nccl", cuda, shared_gpu=True)


class _Recorder:
    def __init__(self, monkeypatch, *, fails: bool = False) -> None:
        self.calls: list = []
        monkeypatch.setattr(distributed, "launched_by_torchrun", lambda: True)
        monkeypatch.setattr(distributed, "init", self.init)
        monkeypatch.setattr(distributed, "cleanup", lambda: self.calls.append("cleanup"))
        recorder = self

        class FakeTrainer:
            def __init__(self, config, *, resume: bool, progress: bool) -> None:
                recorder.calls.append("trainer")

            def fit(self) -> Path:
                if fails:
                    raise RuntimeError("CUDA out of memory")
                return Path("run")

        monkeypatch.setattr(trainer_module, "Trainer", FakeTrainer)

    def init(self, backend: str, device: torch.device, *, shared_gpu: bool = False) -> str:
        name = distributed.choose_backend(backend, device, shared_gpu=shared_gpu)
        self.calls.append(("init", name, str(device)))
        return name


def _config(tmp_path: Path, **overrides):
    return resolve_config("folder", str(tmp_path), str(tmp_path / "run"), overrides=overrides)


def test_two_processes_on_one_gpu_with_share_gpus_both_use_cuda_0_over_gloo(monkeypatch, gpus, tmp_path) -> None:
    gpus(1)
    recorder = _Recorder(monkeypatch)
    for rank in (0, 1):
        _torchrun(monkeypatch, rank, 2)
        trainer_module.train(_config(tmp_path, device="cuda", share_gpus=True), progress=False)
    assert recorder.calls == [("init", "gloo", "cuda:0"), "trainer", "cleanup"] * 2


def test_without_share_gpus_a_second_process_on_one_gpu_is_refused_naming_the_counts(
    monkeypatch, gpus, tmp_path
) -> None:
    gpus(1)
    recorder = _Recorder(monkeypatch)
    _torchrun(monkeypatch, 1, 2)
    with pytest.raises(UserValueError, match=r"LOCAL_RANK is 1, but torch sees 1 GPU\(s\)"):
        trainer_module.train(_config(tmp_path, device="cuda"), progress=False)
    gpus(2)
    trainer_module.train(_config(tmp_path, device="cuda"), progress=False)
    assert recorder.calls == [("init", "nccl", "cuda:1"), "trainer", "cleanup"]


def test_a_failed_run_leaves_the_process_group_to_torchrun(monkeypatch, tmp_path) -> None:
    """Destroying the group while peers sit in a collective can block; a failed process exits with its error."""
    recorder = _Recorder(monkeypatch, fails=True)
    _torchrun(monkeypatch, 0, 2)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer_module.train(_config(tmp_path, device="cpu"), progress=False)
    assert recorder.calls == [("init", "gloo", "cpu"), "trainer"]
