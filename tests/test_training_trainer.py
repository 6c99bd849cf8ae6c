"""The trainer on tiny synthetic data: files written, resume reproduces an unbroken run, bad settings refused."""

from __future__ import annotations

import copy
import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import training.trainer as trainer_module
from training.config import load_config_file, resolve_config
from training.trainer import Trainer, lr_factor


def _images(root: Path, classes: int = 6, per_class: int = 4) -> Path:
    rng = np.random.default_rng(1)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        colour = rng.integers(0, 256, size=3)
        for i in range(per_class):
            pixels = np.clip(colour + rng.integers(-40, 41, size=(20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.png")
    return root


def _config(data: Path, out: Path, **overrides):
    settings = dict(
        arch="resnet18",
        pretrained="none",
        dim=8,
        image_size=16,
        epochs=2,
        batch_size=4,
        images_per_class=2,
        lr=0.05,
        workers=0,
        device="cpu",
        eval_every=1,
        triplets_every=2,
    )
    settings.update(overrides)
    return resolve_config("folder", str(data), str(out), overrides=settings)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_an_interruption_matches_an_unbroken_run(tmp_path: Path) -> None:
    data = _images(tmp_path / "data")
    Trainer(_config(data, tmp_path / "whole"), progress=False).fit()

    def log_a_line_of_the_next_epoch(trainer: Trainer) -> None:
        # the process dies after the first checkpoint, with the next epoch's first lines already logged
        with open(trainer.run.metrics_path, "a") as metrics:
            metrics.write(json.dumps({"iter": trainer.iteration, "epoch": 1, "loss": 123.0}) + "\n")

    kill_after_first_checkpoint_then_resume(
        _config(data, tmp_path / "broken"), before_dying=log_a_line_of_the_next_epoch
    )

    whole, resumed = _metrics(tmp_path / "whole"), _metrics(tmp_path / "broken")
    assert [m["iter"] for m in whole] == [m["iter"] for m in resumed]
    for a, b in zip(whole, resumed):
        for key in ("loss", "hard_fraction", "mean_s_ap", "recall@1"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (a, b)


def kill_after_first_checkpoint_then_resume(config, *, before_dying=None, prepare=None) -> None:
    """Train ``config`` until its first checkpoint is written, die there, then finish it with --resume.
    ``prepare(trainer)`` runs on both Trainers before they start; ``before_dying(trainer)`` just before dying."""

    class Killed(Exception):
        pass

    trainer = Trainer(config, progress=False)
    save = trainer.run.save_checkpoint

    def save_then_die(state, recall):
        best = save(state, recall)
        if state["epoch"] == 0:
            if before_dying:
                before_dying(trainer)
            raise Killed
        return best

    trainer.run.save_checkpoint = save_then_die  # this run folder only: the Trainer below gets its own
    if prepare:
        prepare(trainer)
    with pytest.raises(Killed):
        trainer.fit()
    resumed = Trainer(config, resume=True, progress=False)
    if prepare:
        prepare(resumed)
    resumed.fit()


def test_constructing_a_trainer_writes_nothing_until_it_starts(tmp_path: Path) -> None:
    """The run folder appears when the run starts (fit, or a first evaluate); --resume reads last.pt then."""
    data = _images(tmp_path / "data")
    config = _config(data, tmp_path / "run", epochs=1, eval_every=0)
    trainer = Trainer(config, progress=False)
    assert not (tmp_path / "run").exists()
    resuming = Trainer(_config(data, tmp_path / "nothing", epochs=1), resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="--resume: .*last.pt does not exist"):
        resuming.fit()
    trainer.evaluate(-1)
    assert [m["type"] for m in _metrics(tmp_path / "run")] == ["eval"]
    trainer.fit()
    lines = _metrics(tmp_path / "run")
    assert lines[0]["type"] == "eval" and lines[0]["epoch"] == -1  # the log the first evaluation began goes on
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "best.pt",
        "config.yaml",
        "last.pt",
        "metrics.jsonl",
        "triplets",
    ]


def test_run_folder_contents(tmp_path: Path) -> None:
    data = _images(tmp_path / "data")
    config = _config(data, tmp_path / "run", epochs=1)
    run = Trainer(config, progress=False).fit()
    assert (run / "config.yaml").read_text().startswith("dataset: folder")
    assert load_config_file(run / "config.yaml") == config
    state = torch.load(run / "best.pt", weights_only=True)
    assert state["epoch"] == 0 and state["config"]["dim"] == 8
    lines = _metrics(run)
    steps = [m for m in lines if "loss" in m]
    assert steps and all(
        {"loss", "hard_fraction", "mean_s_ap", "mean_s_an", "lr", "images_per_s"} <= set(m) for m in steps
    )
    evaluation = [m for m in lines if m.get("type") == "eval"]
    # classes 3-5 are the test split: 12 leave-one-out queries; best.pt holds the recall the log reports
    assert len(evaluation) == 1 and evaluation[0]["queries"] == 12 and evaluation[0]["split"] == "test"
    assert state["best_recall"] == evaluation[0]["recall@1"] and evaluation[0]["recall@1"] in {
        k / 12 for k in range(13)
    }
    saved = sorted((run / "triplets").glob("*.npz"))
    assert saved, "triplet pairs should be saved every 2 iterations"
    pairs = np.load(saved[0])
    assert pairs["s_ap"].shape == pairs["s_an"].shape and pairs["s_ap"].ndim == 1


def test_learning_rate_schedules() -> None:
    step = _config(Path("."), Path("."), epochs=10, lr=1.0, schedule="step")
    step.milestones, step.warmup_iters = [0.5, 0.75], 0
    assert [lr_factor(e * 5, step, 5) for e in (0, 4, 5, 7, 8, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = _config(Path("."), Path("."), epochs=2, schedule="cosine", warmup_iters=4)
    assert lr_factor(0, cosine, 10) == pytest.approx(0.25)
    assert lr_factor(10, cosine, 10) == pytest.approx(0.5)
    assert lr_factor(20, cosine, 10) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "override,message",
    [
        ({"batch_size": 5}, "not a multiple"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"precision": "fp8"}, "precision"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_bad_settings_are_refused_with_a_message(override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _config(Path("."), Path("."), **override)


def test_unknown_yaml_setting_is_named(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        resolve_config("folder", ".", ".", config_file=str(config_file))


def test_evaluation_splits_follow_each_benchmark_protocol() -> None:
    from catalog import ImageRecord
    from training.trainer import evaluation_splits

    def splits(dataset: str, *present: str) -> tuple[str | None, str | None]:
        """The split of the queries and of the gallery (None: leave-one-out) that ``dataset`` evaluates."""
        records = [ImageRecord(f"{s}{i}.png", "x", s) for s in present for i in range(2)]
        queries, gallery = evaluation_splits(records, dataset)
        (query_split,) = {r.split for r in queries} or {None}
        (gallery_split,) = {r.split for r in gallery} if gallery is not None else {None}
        return query_split, gallery_split

    assert splits("cub", "train", "test") == ("test", None)
    assert splits("inshop", "train", "query", "gallery") == ("query", "gallery")
    assert splits("hotels50k", "train", "query") == ("query", "train")  # the gallery is the train set
    assert splits("cub", "train") == (None, None)  # nothing to evaluate on
    # A folder's split.csv may lay out In-shop's or Hotels-50K's protocol instead of a test split
    assert splits("folder", "train", "test", "query", "gallery") == ("test", None)
    assert splits("folder", "train", "query", "gallery") == ("query", "gallery")
    assert splits("folder", "train", "query") == ("query", "train")


def test_corrupt_images_and_one_image_classes_are_reported_not_fatal(tmp_path: Path, capsys) -> None:
    # Sorted class folders: a0, a1_lonely, a2 train; b0, b1, b2 test. After a1_lonely is dropped,
    # every P×K = 2×2 batch holds all four training images, the two unreadable ones included.
    data = tmp_path / "data"
    sizes = {"a0": 2, "a1_lonely": 1, "a2": 2, "b0": 3, "b1": 3, "b2": 3}
    rng = np.random.default_rng(0)
    for name, count in sizes.items():
        (data / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(data / name / f"{i}.png")
    (data / "a0" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (data / "a2" / "1.png").write_bytes(b"")
    run = Trainer(_config(data, tmp_path / "run", epochs=2), progress=False).fit()
    out = capsys.readouterr().out
    assert "dropped 1 class(es) with fewer than 2 training images: a1_lonely" in out
    assert "a0/0.png" in out and "a2/1.png" in out
    assert "skipped 4 unreadable training image(s) in all" in out  # two per epoch
    assert (run / "best.pt").is_file()


def test_saved_triplets_carry_their_similarities_one_step_later(tmp_path: Path) -> None:
    """A run of one step: s_ap_after / s_an_after are the batch's triplets re-measured with the weights that
    step left, which last.pt holds (training/step_stats.py checks the measurement itself)."""
    from training.model import build_model
    from training.trainer import training_loader

    data = _images(tmp_path / "data")
    config = _config(
        data,
        tmp_path / "run",
        epochs=1,
        max_iters_per_epoch=1,
        triplets_every=1,
        precision="fp32",
        augment=False,
        eval_every=0,
    )
    trainer = Trainer(config, progress=False)
    loader = training_loader(trainer.dataset, trainer.sampler, config, torch.device("cpu"))
    loader.batch_sampler.set_epoch(0)
    batch = next(iter(loader))  # the batch the run's one step trains on
    run = trainer.fit()
    saved = np.load(run / "triplets" / "iter_0000000.npz")
    model = build_model(config.arch, config.dim, "none", embedding_bn=config.embedding_bn)
    model.load_state_dict(torch.load(run / "last.pt", weights_only=True)["model"])
    model.train()
    with torch.no_grad():
        images = trainer.normalize(batch.images.contiguous(memory_format=torch.channels_last))
        unit = torch.nn.functional.normalize(model(images), dim=1).numpy()
    assert len(saved["triplets"]) == len(batch.labels)
    for row, (a, p, n) in enumerate(saved["triplets"]):
        assert batch.labels[a] == batch.labels[p] != batch.labels[n]
        assert saved["s_ap_after"][row] == pytest.approx(float(unit[a] @ unit[p]), abs=1e-4)
        assert saved["s_an_after"][row] == pytest.approx(float(unit[a] @ unit[n]), abs=1e-4)
    assert saved["s_ap"].shape == saved["s_ap_after"].shape == (len(saved["triplets"]),)
    assert not np.allclose(saved["s_an"], saved["s_an_after"]), "one step at lr 0.05 moves something"


def test_validation_split_is_carved_from_training_classes(tmp_path: Path, capsys) -> None:
    # folder layout without split.csv: classes 0-2 train, 3-5 test; one training class is held out
    data = _images(tmp_path / "data")
    run = Trainer(_config(data, tmp_path / "run", epochs=1, val_fraction=0.34), progress=False).fit()
    assert "evaluating on 4 held-out training images (1 classes)" in capsys.readouterr().out
    evaluation = [m for m in _metrics(run) if m.get("type") == "eval"]
    assert evaluation and all(m["split"] == "val" and m["queries"] == 4 for m in evaluation)
    plain = Trainer(_config(data, tmp_path / "plain", epochs=1), progress=False).fit()
    assert [m["split"] for m in _metrics(plain) if m.get("type") == "eval"] == ["test"]


@pytest.mark.parametrize("override,message", [({"val_fraction": 1.0}, "val_fraction"), ({"val_by": "x"}, "val_by")])
def test_bad_validation_settings_are_named(override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _config(Path("."), Path("."), **override)


CAN_BUILD_CPP = shutil.which("g++") is not None and Path(sysconfig.get_paths()["include"], "Python.h").exists()


@pytest.mark.skipif(
    not CAN_BUILD_CPP,
    reason="torch.compile on the CPU needs g++ and the Python headers "
    "(apt install g++ python3-dev; ./dev.sh test installs them)",
)
def test_compiled_training_computes_the_same_gradients_and_saves_a_plain_checkpoint(tmp_path: Path) -> None:
    data = _images(tmp_path / "data")
    settings = dict(epochs=2, max_iters_per_epoch=2, eval_every=1, triplets_every=0, precision="fp32", augment=False)
    Trainer(_config(data, tmp_path / "eager", **settings), progress=False).fit()
    compiled = Trainer(_config(data, tmp_path / "compiled", compile=True, **settings), progress=False)
    assert isinstance(compiled.train_model, torch._dynamo.eval_frame.OptimizedModule)
    compiled.fit()
    eager, ours = _metrics(tmp_path / "eager"), _metrics(tmp_path / "compiled")
    assert [m["iter"] for m in eager] == [m["iter"] for m in ours]
    assert ours[0]["loss"] == pytest.approx(eager[0]["loss"], rel=1e-3)  # same weights, same batch
    state = torch.load(tmp_path / "compiled" / "last.pt", weights_only=True)
    assert state["config"]["compile"] is True
    assert state["model"].keys() == torch.load(tmp_path / "eager" / "last.pt", weights_only=True)["model"].keys()
    # Whole trajectories drift apart: SCT's hard/easy choice is discontinuous and this tiny BatchNorm net
    # (1×1 maps in layer 4, 4 images) amplifies float rounding. So compare gradients at the same weights.
    model, loss_fn = compiled.model, compiled.loss_fn
    model.zero_grad(set_to_none=True)
    twin = copy.deepcopy(model)
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([0, 0, 1, 1])
    model.train(), twin.train()
    loss_fn(compiled.train_model(images).float(), labels).backward()
    loss_fn(twin(images).float(), labels).backward()
    # The tolerance scales with the largest gradient of the whole net: some gradients are zero but for rounding
    # (fc's bias, before the embedding BatchNorm, which removes any shift of the batch)
    scale = max(theirs.grad.abs().max().item() for theirs in twin.parameters())
    for (name, ours_), theirs in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(ours_.grad, theirs.grad, rtol=1e-3, atol=2e-3 * scale), name


def test_augmentations_do_not_depend_on_worker_processes_which_persist_across_epochs(
    tmp_path: Path, monkeypatch
) -> None:
    made, make = [], trainer_module.training_loader
    monkeypatch.setattr(
        trainer_module, "training_loader", lambda *args, **kwargs: made.append(make(*args, **kwargs)) or made[-1]
    )
    data = _images(tmp_path / "data", per_class=6)
    settings = dict(epochs=3, eval_every=0, triplets_every=0, precision="fp32", augment=True)
    Trainer(_config(data, tmp_path / "main", workers=0, **settings), progress=False).fit()
    Trainer(_config(data, tmp_path / "workers", workers=2, **settings), progress=False).fit()
    assert len(made) == 2 and made[1].persistent_workers and made[1].num_workers == 2  # one loader per run
    in_main, in_workers = _metrics(tmp_path / "main"), _metrics(tmp_path / "workers")
    assert len(in_main) == len(in_workers) > 6
    for a, b in zip(in_main, in_workers):
        for key in ("loss", "mean_s_ap", "mean_s_an", "recall@1"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-6), (key, a, b)
    different = Trainer(_config(data, tmp_path / "seed1", workers=0, seed=1, **settings), progress=False)
    different.fit()
    assert [m.get("loss") for m in _metrics(tmp_path / "seed1")] != [m.get("loss") for m in in_main]


@pytest.mark.parametrize("loss", ["sct", "htl"])
def test_a_finished_trainer_is_freed_without_the_cycle_collector(tmp_path: Path, loss: str) -> None:
    """No part (scheduler, run folder, evaluator, HTL schedule, stall watch) holds the Trainer: a Trainer in a
    reference cycle outlives train(), and under torchrun its DDP wrapper keeps gloo's threads alive past
    destroy_process_group() (test_training_distributed.py checks that under torchrun, slowly)."""
    import gc
    import weakref

    data = _images(tmp_path / "data")
    trainer = Trainer(_config(data, tmp_path / "run", epochs=1, loss=loss, htl_neighbours=2), progress=False)
    gc.collect()
    gc.disable()
    try:
        trainer.fit()
        freed = weakref.ref(trainer)
        del trainer
        assert freed() is None
    finally:
        gc.enable()
