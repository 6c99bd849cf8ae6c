"""Settings resolution: dataset defaults, per-loss learning rates with SGD, optimiser-specific defaults."""
from __future__ import annotations

import pytest

from training.config import DATASET_DEFAULTS, SGD_LR_FACTORS, resolve_config


def _resolve(dataset: str, **overrides):
    return resolve_config(dataset, "data", "out", overrides=overrides, cuda_available=True)


@pytest.mark.parametrize("loss", ["hn", "shn"])
def test_baselines_get_their_own_sgd_learning_rate(loss: str) -> None:
    sct = _resolve("cub", loss="sct").lr
    assert sct == DATASET_DEFAULTS["cub"]["lr"]
    assert _resolve("cub", loss=loss).lr == pytest.approx(sct * SGD_LR_FACTORS[loss])
    assert SGD_LR_FACTORS[loss] < 1  # SCT's push on hard triplets is weaker, so SCT takes the larger step


def test_an_explicit_learning_rate_always_wins(tmp_path) -> None:
    assert _resolve("cub", loss="shn", lr=0.05).lr == 0.05
    config_file = tmp_path / "c.yaml"
    config_file.write_text("lr: 0.07\nloss: hn\n")
    assert resolve_config("cub", "data", "out", config_file=str(config_file)).lr == 0.07


def test_the_factor_applies_to_sgd_only() -> None:
    assert _resolve("cub", loss="shn", optimizer="adamw").lr == DATASET_DEFAULTS["cub"]["lr"]
    demo = DATASET_DEFAULTS["fashion-mnist"]
    assert demo["optimizer"] == "adamw" and _resolve("fashion-mnist", loss="shn").lr == demo["lr"]


def test_htl_gets_its_own_batch_composition() -> None:
    cub = _resolve("cub", loss="htl")
    assert (cub.images_per_class, cub.htl_neighbours, cub.batch_size) == (4, 4, 128)  # 8 groups of 4 classes × 4
    assert _resolve("cub", loss="sct").images_per_class == 2  # the paper's K for SCT is untouched
    demo = _resolve("fashion-mnist", loss="htl")
    assert (demo.images_per_class, demo.htl_neighbours) == (12, 5)  # 2 groups × 5 classes × 12 = all 10 classes
    assert _resolve("cub", loss="htl", images_per_class=8).images_per_class == 8  # explicit wins


def test_yaml_numbers_in_exponent_form_are_read_as_numbers(tmp_path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("lr: 1e-5\nlam: 0.5\n")  # PyYAML reads 1e-5 as the string "1e-5"
    config = resolve_config("cub", "data", "out", config_file=str(config_file))
    assert config.lr == 1e-5 and isinstance(config.lr, float) and config.lam == 0.5
    config_file.write_text("lr: fast\n")
    with pytest.raises(ValueError, match="lr must be a number, got 'fast'"):
        resolve_config("cub", "data", "out", config_file=str(config_file))


def test_the_demo_switched_to_sgd_takes_the_tuned_sgd_settings() -> None:
    """Fashion-MNIST's own SGD tuning (HN, SHN and SCT all best at 0.3) replaces the AdamW settings and
    the generic per-loss factors."""
    for loss in ("sct", "shn", "hn"):
        config = _resolve("fashion-mnist", loss=loss, optimizer="sgd")
        assert (config.lr, config.momentum, config.weight_decay) == (0.3, 0.0, 0.0), loss
    assert _resolve("fashion-mnist", loss="shn").lr == DATASET_DEFAULTS["fashion-mnist"]["lr"]  # AdamW untouched
    assert _resolve("cub", loss="shn").lr == pytest.approx(DATASET_DEFAULTS["cub"]["lr"] * SGD_LR_FACTORS["shn"])


def test_on_cuda_each_process_gets_its_share_of_the_cpus_as_decoders(monkeypatch) -> None:
    import training.workers

    monkeypatch.setattr(training.workers, "usable_cpus", lambda: 40)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert _resolve("cub").workers == 16  # capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 torchrun processes on this machine
    assert _resolve("cub").workers == 5
    assert _resolve("cub", workers=3).workers == 3  # a flag wins
    assert _resolve("fashion-mnist").workers == DATASET_DEFAULTS["fashion-mnist"]["workers"]  # so does the dataset
    cpu = resolve_config("cub", "data", "out", cuda_available=False)
    assert cpu.workers == resolve_config("cub", "data", "out", overrides={"device": "cpu"}).workers == 4
