"""The training step's hot loop: what makes the host wait for the device, the files and progress bar it touches
per step, and the settings for a CUDA device, checked on the CPU by counting the calls that would wait."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_training_trainer import _config as trainer_config
from tests.test_training_trainer import _images
from training.htl import build_tree, margins
from training.losses import LOSSES, HTLLoss, build_loss
from training.trainer import Trainer

# Tensor methods that copy a device tensor's value to the host, so that on CUDA the host waits for the device.
_WAITING = ("item", "__bool__", "__int__", "__float__", "__index__", "cpu", "tolist", "numpy", "nonzero")


@contextlib.contextmanager
def host_waits() -> Iterator[Counter]:
    """Counts, by name, the calls inside that would make the host wait on a CUDA device: the methods above, and
    indexing with a boolean mask (whose result's size the host must learn)."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in _WAITING + ("__getitem__",)}

    def counting(name):
        original = originals[name]

        def wrapper(self, *args, **kwargs):
            if name != "__getitem__":
                counts[name] += 1
            else:
                index = args[0] if isinstance(args[0], tuple) else (args[0],)
                if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                    counts["boolean mask"] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name in originals:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_the_counter_sees_each_kind_of_wait() -> None:
    """The instrument itself: each waiting call is counted (so a test finding none is not blind)."""
    x = torch.tensor([1.0, -1.0])
    with host_waits() as counts:
        bool(x[0] > 0), int(x[0]), float(x[1]), x.sum().item(), x.cpu(), x.tolist(), x.nonzero(), x[x > 0]
    assert counts == Counter({n: 1 for n in ("__bool__", "__int__", "__float__", "item", "cpu", "tolist")}) + Counter(
        {"nonzero": 1, "boolean mask": 1}
    )


def _batch(classes: int = 4, per_class: int = 3, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(classes * per_class, dim, generator=generator, requires_grad=True)
    return embeddings, torch.arange(classes).repeat_interleave(per_class)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("sct_weight", [1.0, 0.5])
def test_no_loss_makes_the_host_wait_in_its_forward_or_backward_pass(name: str, sct_weight: float) -> None:
    if sct_weight < 1 and name != "sct":
        pytest.skip("the warm start is SCT's")
    loss_fn = build_loss(name, lam=1.0, temperature=0.1, hard_threshold=None)
    if name == "sct":
        loss_fn.sct_weight = sct_weight
    if name == "htl":
        loss_fn.set_tree(_tree(classes=4))
    embeddings, labels = _batch()
    with host_waits() as counts:
        loss_fn(embeddings, labels).backward()
    assert sum(counts.values()) == 0, dict(counts)


def _tree(classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), 3)
    centres = rng.normal(size=(classes, 16))[labels] + 0.5 * rng.normal(size=(len(labels), 16))
    unit = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    return build_tree(unit.astype(np.float32), labels, classes, levels=4, neighbours=3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_htl_margins_on_the_device_equal_the_numpy_margins_of_the_tree(seed: int) -> None:
    classes = 30
    tree = _tree(classes, seed)
    assert 1 < len(np.unique(tree.level_ids[1])) < classes, "level 1 merges some classes, not all"
    rng = np.random.default_rng(seed + 10)
    anchors, negatives = rng.integers(0, classes, size=40), rng.integers(0, classes, size=64)
    loss_fn = HTLLoss(beta=0.2)
    loss_fn.set_tree(tree)
    ours = loss_fn.class_margins(torch.from_numpy(anchors), torch.from_numpy(negatives))
    expected = margins(tree, anchors[:, None], negatives[None, :], 0.2).astype(np.float32)
    assert ours.dtype == torch.float32 and ours.shape == (40, 64)
    assert np.array_equal(ours.numpy(), expected)
    assert len(np.unique(expected)) > 2, "the pairs merge at several levels"


def _config(tmp_path: Path, **overrides):
    """One epoch, no evaluation until the last, no triplet snapshots, fp32, on the CPU (the trainer tests' data)."""
    settings = dict(epochs=1, batch_size=8, eval_every=0, triplets_every=0, precision="fp32")
    return trainer_config(_images(tmp_path / "data", classes=4), tmp_path / "run", **{**settings, **overrides})


@pytest.mark.parametrize("loss", ["sct", "ep", "batch-all"])
def test_a_training_step_waits_for_the_device_once(tmp_path: Path, loss: str) -> None:
    """The step's loss and statistics come to the host in one copy (step_summary's .tolist()); the loss, its
    backward pass and the optimizer step never wait. (SGD here: AdamW reads its step counters with .item(), but
    they live on the host even on CUDA, so that is no wait for the device, which this counter cannot tell.)"""
    from training.trainer import training_loader

    config = _config(tmp_path, loss=loss, optimizer="sgd")
    trainer = Trainer(config, progress=False)
    trainer._start()
    loader = training_loader(trainer.dataset, trainer.sampler, config, trainer.device)
    loader.batch_sampler.set_epoch(0)
    batch = next(iter(loader))
    with host_waits() as counts:
        record = trainer._train_step(batch, 0)
    assert counts == Counter({"tolist": 1}), dict(counts)
    assert np.isfinite(record["loss"]) and 0.0 <= record["hard_fraction"] <= 1.0


class _RecordingBar:
    """Stands in for tqdm in the trainer, keeping each set_postfix call's keywords."""

    calls: list[dict] = []

    def __init__(self, *args, **kwargs) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        _RecordingBar.calls.append(kwargs)

    def update(self, *args) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_run_opens_metrics_jsonl_once_and_never_forces_the_progress_bar_to_redraw(
    tmp_path: Path, monkeypatch
) -> None:
    import builtins

    import training.run_folder as run_folder_module
    import training.trainer as trainer_module

    opened: list[str] = []

    def counting_open(file, *args, **kwargs):
        opened.append(Path(file).name)
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(run_folder_module, "open", counting_open, raising=False)
    monkeypatch.setattr(trainer_module, "tqdm", _RecordingBar)
    _RecordingBar.calls = []
    run = Trainer(_config(tmp_path, epochs=2, batch_size=4), progress=True).fit()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    steps = [line for line in lines if '"type"' not in line]
    assert len(steps) >= 4 and len(lines) > len(steps), "several steps and an evaluation logged"
    assert opened.count("metrics.jsonl") == 1
    assert len(_RecordingBar.calls) == len(steps)
    assert all(call.get("refresh") is False for call in _RecordingBar.calls)


def test_each_metrics_line_is_in_the_file_as_soon_as_it_is_logged_and_a_resume_writes_to_the_kept_lines(
    tmp_path: Path,
) -> None:
    """Kept open, the file still holds every line logged (a crash loses none), and truncating it for a resume
    sends the next lines to the truncated file, not to the one it replaced."""
    from training.run_folder import RunFolder

    folder = RunFolder(tmp_path)
    folder.start_metrics()
    for iteration in range(3):
        folder.log({"iter": iteration})
        assert (tmp_path / "metrics.jsonl").read_text().count("\n") == iteration + 1  # before any close
    assert [line["iter"] for line in folder.truncate_metrics(2)] == [0, 1]
    folder.log({"iter": 2, "again": True})
    folder.close()
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == [
        '{"iter": 0}',
        '{"iter": 1}',
        '{"iter": 2, "again": true}',
    ]


@pytest.mark.parametrize("device,expected", [("cuda", True), ("cuda:1", True), ("cpu", False)])
def test_the_convolution_autotuner_is_on_for_cuda_only(monkeypatch, device: str, expected: bool) -> None:
    from training.cuda_step import tune_convolutions

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    tune_convolutions(torch.device(device))
    assert torch.backends.cudnn.benchmark is expected


def test_the_trainer_tunes_convolutions_for_its_device(tmp_path: Path, monkeypatch) -> None:
    import training.trainer as trainer_module

    seen: list[torch.device] = []
    monkeypatch.setattr(trainer_module, "tune_convolutions", seen.append)
    trainer = Trainer(_config(tmp_path), progress=False)
    assert seen == [trainer.device] == [torch.device("cpu")]


@pytest.mark.parametrize("count", [0, 1, 2, 5])
def test_the_prefetcher_yields_every_batch_in_order_with_the_next_copy_already_started(count: int) -> None:
    from training.cuda_step import one_ahead

    events: list[tuple[str, int]] = []

    def start(item: int) -> int:
        events.append(("start", item))
        return item * 10

    def finish(started: int) -> int:
        events.append(("finish", started // 10))
        return started + 1

    yielded = []
    for item in one_ahead(iter(range(count)), start, finish):
        events.append(("use", (item - 1) // 10))
        yielded.append(item)
    assert yielded == [10 * i + 1 for i in range(count)]
    for i in range(count):  # batch i is used after batch i + 1's copy was started, and after its own finished
        used = events.index(("use", i))
        assert events.index(("start", i)) < events.index(("finish", i)) < used
        if i + 1 < count:
            assert events.index(("start", i + 1)) < used
    assert sum(kind == "start" for kind, _ in events) == count


@pytest.mark.parametrize("sync_batchnorm", [False, True])
def test_ddp_broadcasts_buffers_only_without_synchronised_batchnorm(monkeypatch, sync_batchnorm: bool) -> None:
    from training import distributed
    from training.model import build_model

    made: list[dict] = []
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "DistributedDataParallel", lambda model, **kwargs: made.append(kwargs) or model)
    model = build_model("resnet18", 8, "none", embedding_bn=True)
    if sync_batchnorm:
        model = distributed.convert_sync_batchnorm(model, torch.device("cpu"))
    distributed.wrap(model, torch.device("cpu"))
    assert made == [{"device_ids": None, "broadcast_buffers": not sync_batchnorm}]


def test_the_samplers_deal_the_same_batches_as_before_for_a_seed() -> None:
    """Batches recorded from the samplers before the class draw looked classes up in a set: the same ones."""
    from training.sampler import HTLBatchSampler, PKBatchSampler

    labels = [c for c in range(7) for _ in range(3)] + [7]
    sampler = PKBatchSampler(labels, 3, 2, seed=5)
    sampler.set_epoch(1)
    assert list(sampler) == [[3, 5, 10, 11, 20, 19], [21, 21, 2, 0, 15, 16], [8, 7, 14, 13, 21, 21]]
    htl = HTLBatchSampler(labels, 2, 2, 2, seed=5)
    htl.update_neighbours(np.array([[1, 2], [0, 3], [3, -1], [2, 1], [5, 6], [4, 6], [5, 4], [0, 1]]))
    htl.set_epoch(1)
    assert list(htl) == [[3, 5, 1, 2, 11, 10, 8, 6], [18, 19, 17, 16, 21, 21, 0, 2]]


@pytest.mark.parametrize(
    "cpus,processes,cap,expected",
    [(16, 1, 16, 14), (18, 1, 16, 16), (40, 8, 16, 3), (3, 1, 16, 1), (1, 1, 16, 1), (64, 1, 4, 4), (5, 1, 4, 3)],
)
def test_the_default_worker_count_leaves_two_cpus_to_the_process(
    monkeypatch, cpus: int, processes: int, cap: int, expected: int
) -> None:
    import core.cpus

    monkeypatch.setattr(core.cpus, "usable_cpus", lambda: cpus)
    assert core.cpus.default_workers({"LOCAL_WORLD_SIZE": str(processes)}, cap=cap) == expected


def test_training_decodes_a_large_jpeg_reduced_and_evaluation_decodes_it_whole(tmp_path: Path, monkeypatch) -> None:
    """The training dataset asks Pillow for a reduced JPEG decode (draft) no smaller than twice the resize side;
    the evaluation loader's dataset decodes the whole image, as sct index and the exported model do."""
    from PIL import Image, JpegImagePlugin

    import training.data as data_module
    from catalog import ImageRecord
    from training.trainer import preprocessing_of
    from training.transforms import eval_pixels, train_pixels

    path = tmp_path / "large.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(1200, 1600, 3), dtype=np.uint8)).save(path, quality=90)
    drafts: list[tuple] = []
    original_draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(
        JpegImagePlugin.JpegImageFile, "draft", lambda self, *a: drafts.append(a) or original_draft(self, *a)
    )
    decoded: list[tuple[int, int]] = []
    original_load = data_module.load_rgb

    def recording_load(*args, **kwargs):
        image = original_load(*args, **kwargs)
        decoded.append(image.size)
        return image

    monkeypatch.setattr(data_module, "load_rgb", recording_load)
    config = _config(tmp_path, image_size=224)
    spec = preprocessing_of(config)
    records = [ImageRecord(path=str(path), label="a", split="train")]
    side = data_module.training_decode_side(spec, augment=True)
    assert side == 2 * int(224 * 1.1)
    data_module.RecordImages(records, {"a": 0}, train_pixels(spec), min_side=side)[0]
    assert drafts == [(None, (side, side))] and decoded == [(800, 600)]  # 1/2 scale: 600 ≥ 492 > 1200 / 4
    drafts.clear(), decoded.clear()
    data_module.RecordImages(records, {"a": 0}, eval_pixels(spec))[0]  # what embed_records_kept builds
    assert drafts == [] and decoded == [(1600, 1200)]
    for augment, expected in ((True, side), (False, 2 * 224)):  # the trainer's training images
        trainer = Trainer(_config(tmp_path / str(augment), image_size=224, augment=augment), progress=False)
        assert trainer.dataset.min_side == expected


def test_a_second_evaluation_decodes_nothing_and_scores_the_same(tmp_path: Path, monkeypatch) -> None:
    """The evaluation's crops are kept after the first evaluation (its loader too): the second decodes no image
    and logs the same scores."""
    import training.data as data_module

    decoded: list[str] = []
    original_load = data_module.load_rgb

    def counting_load(path, *args, **kwargs):
        decoded.append(str(path))
        return original_load(path, *args, **kwargs)

    monkeypatch.setattr(data_module, "load_rgb", counting_load)
    trainer = Trainer(_config(tmp_path), progress=False)
    queries = len(trainer.evaluator.queries)
    first = trainer.evaluate(0)
    assert len(decoded) == queries > 0
    second = trainer.evaluate(0)
    assert len(decoded) == queries, "the second evaluation decoded images again"
    lines = [line for line in (trainer.run.path / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert first == second and len(lines) == 2 and lines[0] == lines[1]


def test_evaluation_crops_are_kept_only_within_the_memory_budget(tmp_path: Path) -> None:
    from training.data import embedding_loader
    from training.trainer import preprocessing_of

    trainer = Trainer(_config(tmp_path), progress=False)
    records, spec = trainer.evaluator.queries, preprocessing_of(trainer.config)
    need = len(records) * 3 * spec.image_size**2
    cpu = torch.device("cpu")
    assert embedding_loader(records, spec, cpu, keep=True, cache_bytes=need).dataset.cache == {}
    assert embedding_loader(records, spec, cpu, keep=True, cache_bytes=need - 1).dataset.cache is None
    assert embedding_loader(records, spec, cpu, keep=False, cache_bytes=need).dataset.cache is None
    assert embedding_loader(records, spec, cpu, workers=2, keep=True).persistent_workers
