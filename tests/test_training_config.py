"""Settings resolution: dataset defaults, per-loss learning rates with SGD, optimiser-specific defaults,
decoders per CPU, Recall@K's Ks, refused values, and the provenance of each setting."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from training.config import DATASET_DEFAULTS, SGD_LR_FACTORS, START_DEFAULTS, load_config_file, resolve_config

ROOT = Path(__file__).resolve().parents[1]


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
    import core.cpus

    monkeypatch.setattr(core.cpus, "usable_cpus", lambda: 40)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert _resolve("cub").workers == 16  # capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 torchrun processes on this machine
    assert _resolve("cub").workers == 3  # 40 / 8 = 5 CPUs each, 2 of them left to the process itself
    assert _resolve("cub", workers=3).workers == 3  # a flag wins
    assert _resolve("fashion-mnist").workers == DATASET_DEFAULTS["fashion-mnist"]["workers"]  # so does the dataset
    cpu = resolve_config("cub", "data", "out", cuda_available=False)
    assert cpu.workers == resolve_config("cub", "data", "out", overrides={"device": "cpu"}).workers == 3  # 5 − 2


def test_on_a_cpu_the_decoders_follow_the_usable_cpus_and_torch_does_not_warn(monkeypatch) -> None:
    """torch's DataLoader warns when it gets more workers than the CPUs in os.sched_getaffinity."""
    import torch.utils.data

    # 4 at most: on a CPU the other cores run the model; 2 CPUs are left to the training process, 1 worker at least
    for cpus, expected in ((2, 1), (3, 1), (5, 3), (1, 1), (40, 4)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, cpus=cpus: set(range(cpus)))
        config = resolve_config("cub", "data", "out", cuda_available=False)
        assert config.workers == expected
        loader = torch.utils.data.DataLoader(range(8), num_workers=config.workers)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loader.check_worker_number_rationality()


def test_resolving_a_training_config_loads_neither_onnxruntime_nor_faiss() -> None:
    probe = "import sys, {module}\n{call}\n" "print(sorted(m for m in ('onnxruntime', 'faiss') if m in sys.modules))"
    resolve = probe.format(module="training.config", call="training.config.resolve_config('cub', 'data', 'out')")
    control = probe.format(module="retrieval.embedder", call="")  # the probe sees ONNX Runtime where it is loaded
    outputs = [
        subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        for code in (resolve, control)
    ]
    assert outputs == ["[]", "['onnxruntime']"]


class _Evaluated(Exception):
    pass


@pytest.mark.parametrize("dataset", ["inshop", "hotels50k", "cub"])
def test_training_logs_recall_at_the_ks_of_sct_eval(dataset: str, monkeypatch) -> None:
    import retrieval.cli
    from sct.cli import build_parser

    class Loaded:
        manifest = {"dataset": dataset}

    def evaluate_gallery(gallery, ks, *args, **kwargs):
        raise _Evaluated(list(ks))

    monkeypatch.setattr(retrieval.cli.Gallery, "load", staticmethod(lambda directory: Loaded()))
    monkeypatch.setattr(retrieval.cli, "evaluate_gallery", evaluate_gallery)
    args = build_parser().parse_args(["eval", "--index", "unused"])
    with pytest.raises(_Evaluated) as evaluated:
        args.func(args)
    assert _resolve(dataset).eval_ks == evaluated.value.args[0]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], True),
        (["--no-embedding-bn"], False),
        (["--pretrained", "imagenet"], False),
        (["--pretrained", "imagenet", "--embedding-bn"], True),
    ],
)
def test_the_embedding_batchnorm_flag_reaches_the_config(flags: list[str], expected: bool) -> None:
    from sct.cli import build_parser
    from training.cli import overrides_from

    args = build_parser().parse_args(
        ["train", "--dataset", "cub", "--data-root", "d", "--out", "o", "--pretrained", "none", *flags]
    )
    assert _resolve("cub", **overrides_from(args)).embedding_bn is expected


def test_the_users_ks_win_over_the_datasets(tmp_path) -> None:
    from sct.cli import build_parser
    from training.cli import overrides_from

    args = build_parser().parse_args(
        ["train", "--dataset", "inshop", "--data-root", "d", "--out", "o", "--eval-ks", "1", "5"]
    )
    assert _resolve("inshop", **overrides_from(args)).eval_ks == [1, 5]
    config_file = tmp_path / "c.yaml"
    config_file.write_text("eval_ks: [1, 3]\n")
    assert resolve_config("hotels50k", "d", "o", config_file=str(config_file)).eval_ks == [1, 3]


@pytest.mark.parametrize(
    "setting,value",
    [
        ("lr", -1.0),
        ("lr", float("nan")),
        ("lr", float("inf")),
        ("weight_decay", -1e-4),
        ("momentum", 1.0),
        ("momentum", -0.5),
        ("epochs", 0),
        ("gamma", 0.0),
        ("temperature", 0.0),
        ("lam", -1.0),
        ("margin", -0.2),
        ("images_per_class", 1),
        ("workers", -1),
        ("warmup_iters", -1),
        ("eval_every", -1),
        ("triplets_every", -1),
        ("max_iters_per_epoch", 0),
        ("hard_threshold", float("nan")),
        ("val_fraction", 1.0),
        ("milestones", [1.5]),
        ("eval_ks", [0]),
        ("eval_ks", []),
    ],
)
def test_nonsense_numbers_are_refused_naming_the_setting_and_value(setting: str, value) -> None:
    with pytest.raises(ValueError, match=rf"^{setting} must be .*, got {value!r}".replace("[", r"\[")):
        _resolve("cub", **{setting: value})


def test_the_edges_that_make_sense_are_accepted() -> None:
    config = _resolve("cub", lr=0.0, momentum=0.9, weight_decay=0.0, eval_every=0, workers=0, triplets_every=0)
    assert (config.lr, config.momentum) == (0.0, 0.9)  # lr 0 measures the untrained network


def test_a_negative_learning_rate_is_refused_from_the_flag_and_the_config_file(tmp_path, monkeypatch, capsys) -> None:
    import training.trainer
    from sct.cli import main

    monkeypatch.setattr(training.trainer, "train", lambda *args, **kwargs: pytest.fail("trained anyway"))
    config_file = tmp_path / "c.yaml"
    config_file.write_text("lr: -1\n")
    for extra in (["--lr", "-1"], ["--config", str(config_file)]):
        assert main(["train", "--dataset", "cub", "--data-root", "d", "--out", str(tmp_path), *extra]) == 2
        assert capsys.readouterr().err.startswith("error: lr must be a finite number at least 0, got -1")


def test_each_setting_is_attributed_to_the_layer_that_set_it(tmp_path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("epochs: 5\nlr: 0.07\n")
    config = resolve_config("cub", "d", "o", config_file=str(config_file), overrides={"lr": 0.05, "loss": "htl"})
    assert (config.lr, config.provenance["lr"]) == (0.05, "flag")  # the flag beats the file
    assert (config.epochs, config.provenance["epochs"]) == (5, "config-file")
    assert (config.images_per_class, config.provenance["images_per_class"]) == (4, "loss:htl")
    from_cub = {name for name, layer in config.provenance.items() if layer == "dataset:cub"}
    assert from_cub and all(getattr(config, name) == DATASET_DEFAULTS["cub"][name] for name in from_cub - {"eval_ks"})
    assert "optimizer" not in config.provenance  # the dataclass default

    shn = _resolve("cub", loss="shn")
    assert shn.provenance["lr"] == "dataset:cub * lr_factor:shn"
    demo = resolve_config("fashion-mnist", "d", "o", overrides={"optimizer": "sgd"}, cuda_available=False)
    assert (demo.provenance["lr"], demo.provenance["epochs"]) == ("optimizer:sgd", "cpu")
    assert demo.epochs == DATASET_DEFAULTS["fashion-mnist"]["cpu"]["epochs"]


def test_sct_train_shows_where_the_key_settings_come_from(tmp_path, monkeypatch, capsys) -> None:
    import training.trainer
    from sct.cli import main

    monkeypatch.setattr(training.trainer, "train", lambda config, **kwargs: Path(config.out))
    assert (
        main(
            [
                "train",
                "--dataset",
                "cub",
                "--data-root",
                "d",
                "--out",
                str(tmp_path),
                "--loss",
                "shn",
                "--epochs",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    shown = capsys.readouterr().out.splitlines()
    expected_lr = DATASET_DEFAULTS["cub"]["lr"] * SGD_LR_FACTORS["shn"]
    assert f"  lr: {expected_lr}  (dataset:cub * lr_factor:shn)" in shown
    assert "  epochs: 3  (flag)" in shown and "  optimizer: sgd  (default)" in shown
    assert f"  batch_size: {DATASET_DEFAULTS['cub']['batch_size']}  (dataset:cub)" in shown


def test_the_saved_config_yaml_loads_back_to_the_same_config(tmp_path) -> None:
    """The run folder writes config.yaml with the provenance; read back, or given back as --config, it is the
    same config (given back, the file set everything)."""
    from training.run_folder import RunFolder

    config_file = tmp_path / "c.yaml"
    config_file.write_text("lr: 1e-3\nepochs: 1\n")
    config = resolve_config(
        "folder",
        str(tmp_path / "data"),
        str(tmp_path / "run"),
        config_file=str(config_file),
        overrides=dict(arch="resnet18", pretrained="none", dim=8, image_size=8, batch_size=4, device="cpu", workers=0),
    )
    RunFolder(config.out).create(config)
    saved = tmp_path / "run" / "config.yaml"
    loaded = load_config_file(saved)
    assert loaded == config and loaded.provenance == config.provenance == {**loaded.provenance, "lr": "config-file"}
    again = resolve_config("folder", config.data_root, config.out, config_file=str(saved))
    assert again == config and set(again.provenance.values()) == {"config-file"}


# ------------------------------------------------------------------ defaults that depend on how training starts


@pytest.mark.parametrize("dataset", ["folder", "cub", "cars", "sop", "inshop", "hotels50k"])
def test_from_scratch_every_preset_takes_the_from_scratch_recipe_over_its_pretrained_one(dataset: str) -> None:
    scratch = START_DEFAULTS["none"]
    config = _resolve(dataset, pretrained="none")
    for name in ("optimizer", "lr", "weight_decay", "momentum", "schedule", "augment", "embedding_bn"):
        assert getattr(config, name) == scratch[name], name
        assert config.provenance[name] == "start:none", name
    assert config.sct_warmup == scratch["losses"]["sct"]["sct_warmup"] > 0  # SCT gets its warm start
    assert (config.dim, config.batch_size, config.epochs) == tuple(
        DATASET_DEFAULTS[dataset][name] for name in ("dim", "batch_size", "epochs")
    )
    assert config.embedding_bn and not _resolve(dataset).embedding_bn  # on from scratch only
    for loss in ("hn", "shn", "ep", "htl"):  # SCT's learning rate, times the loss's factor from scratch if any
        baseline = _resolve(dataset, pretrained="none", loss=loss)
        factor = scratch["lr_factors"].get(loss)
        assert (baseline.lr, baseline.sct_warmup) == (pytest.approx(scratch["lr"] * (factor or 1)), 0.0), loss
        assert baseline.provenance["lr"] == ("start:none" if factor is None else f"start:none * lr_factor:{loss}")


def test_a_checkpoint_of_a_run_from_scratch_takes_the_from_scratch_recipe(tmp_path) -> None:
    """--pretrained PATH: an `sct train` checkpoint whose run started from scratch (also through another such
    checkpoint) gets the from-scratch defaults; one from ImageNet weights, or a torchvision state dict, the
    dataset's recipe for a pretrained trunk."""
    import torch

    def checkpoint(name: str, pretrained: str | None) -> str:
        state = {"model": {"trunk.conv1.weight": torch.zeros(1)}}
        if pretrained is not None:
            state["config"] = {"pretrained": pretrained, "arch": "resnet18"}
        torch.save(state, tmp_path / name)
        return str(tmp_path / name)

    scratch = checkpoint("scratch.pt", "none")
    for path in (scratch, checkpoint("chained.pt", scratch)):
        config = _resolve("cub", pretrained=path)
        assert (config.lr, config.provenance["lr"], config.embedding_bn) == (
            START_DEFAULTS["none"]["lr"],
            "start:none",
            True,
        )
        assert config.pretrained == path and config.sct_warmup == 1.0
    for path in (checkpoint("imagenet.pt", "imagenet"), checkpoint("state_dict.pt", None)):
        config = _resolve("cub", pretrained=path)
        assert (config.lr, config.provenance["lr"], config.embedding_bn) == (
            DATASET_DEFAULTS["cub"]["lr"],
            "dataset:cub",
            False,
        )
    (tmp_path / "not-torch.pt").write_text("hello")
    assert _resolve("cub", pretrained=str(tmp_path / "not-torch.pt")).lr == DATASET_DEFAULTS["cub"]["lr"]


@pytest.mark.parametrize("pretrained", ["imagenet", "/weights/resnet50-from-elsewhere.pth"])
def test_a_pretrained_trunk_keeps_the_datasets_recipe(pretrained: str) -> None:
    config = _resolve("cub", pretrained=pretrained)
    assert (config.optimizer, config.lr, config.provenance["lr"]) == (
        "sgd",
        DATASET_DEFAULTS["cub"]["lr"],
        "dataset:cub",
    )
    assert config.sct_warmup == 0.0 and config.augment is True  # the paper's SCT and augmentation
    assert not any(layer.startswith("start:") for layer in config.provenance.values())


def test_a_preset_that_already_starts_from_scratch_keeps_its_own_tuned_recipe() -> None:
    demo = _resolve("fashion-mnist")
    assert demo.pretrained == "none" and _resolve("fashion-mnist", pretrained="none") == demo
    assert demo.lr == DATASET_DEFAULTS["fashion-mnist"]["lr"] and demo.sct_warmup == 0.0
    # with ImageNet weights it keeps its recipe too, its per-loss and per-optimiser entries included
    assert _resolve("fashion-mnist", pretrained="imagenet", loss="htl").images_per_class == 12
    sgd = _resolve("fashion-mnist", pretrained="imagenet", optimizer="sgd")
    assert sgd.lr == DATASET_DEFAULTS["fashion-mnist"]["sgd"]["lr"]


def test_from_scratch_with_sgd_takes_the_from_scratch_sgd_settings_and_flags_still_win(tmp_path) -> None:
    sgd = START_DEFAULTS["none"]["sgd"]
    for loss in ("sct", "shn", "hn"):  # one learning rate for every loss from scratch
        config = _resolve("cub", pretrained="none", optimizer="sgd", loss=loss)
        assert (config.lr, config.momentum, config.weight_decay) == (sgd["lr"], sgd["momentum"], sgd["weight_decay"])
    assert _resolve("cub", pretrained="none", optimizer="sgd").provenance["momentum"] == "start:none:optimizer:sgd"
    assert _resolve("cub", pretrained="none", lr=0.2).lr == 0.2
    assert _resolve("cub", pretrained="none", sct_warmup=0.0).sct_warmup == 0.0  # the paper's SCT, from scratch
    assert _resolve("cub", pretrained="none", embedding_bn=False).embedding_bn is False  # the paper's head
    config_file = tmp_path / "c.yaml"
    config_file.write_text("pretrained: none\nschedule: step\n")
    from_file = resolve_config("cub", "d", "o", config_file=str(config_file))
    assert (from_file.optimizer, from_file.schedule) == (START_DEFAULTS["none"]["optimizer"], "step")


@pytest.mark.parametrize(("setting", "value"), [("sct_warmup", -0.1), ("sct_warmup", 1.5), ("sct_warm_loss", "hn")])
def test_the_warm_start_settings_are_checked(setting: str, value) -> None:
    with pytest.raises(ValueError, match=setting):
        _resolve("folder", pretrained="none", **{setting: value})
