"""Distributed training on CPU with gloo: sharded sampling, gathered mining with exact gradients, and `sct train`
under torchrun matching one process on the same global batches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml
from torch import nn

from tests.test_training_trainer import _config, _images, _metrics
from training import distributed
from training.htl import build_tree
from training.losses import LOSSES, build_loss
from training.sampler import HTLBatchSampler, PKBatchSampler
from training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------ sharded sampling
@pytest.mark.parametrize("world", [2, 3])
def test_pk_shards_are_whole_classes_and_together_the_single_process_batch(world: int) -> None:
    labels = [c for c in range(9) for _ in range(5)]
    single = PKBatchSampler(labels, 6, 2, seed=4)
    shards = [PKBatchSampler(labels, 6, 2, seed=4, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 1):
        for sampler in (single, *shards):
            sampler.set_epoch(epoch)
        assert all(len(shard) == len(single) for shard in shards)
        for batch, *parts in zip(single, *shards):
            assert [i for part in parts for i in part] == batch
            for part in parts:
                per_class = Counter(labels[i] for i in part)
                assert len(per_class) == 6 // world and set(per_class.values()) == {2}
            assert not set.intersection(*({labels[i] for i in part} for part in parts))


def test_htl_shards_are_whole_groups() -> None:
    labels = [c for c in range(12) for _ in range(5)]
    neighbours = np.array([[d for d in range(c // 4 * 4, c // 4 * 4 + 4) if d != c] for c in range(12)])
    single = HTLBatchSampler(labels, 2, 4, 2, seed=0)
    shards = [HTLBatchSampler(labels, 2, 4, 2, seed=0, rank=r, world_size=2) for r in range(2)]
    for sampler in (single, *shards):
        sampler.update_neighbours(neighbours)
    for batch, first, second in zip(single, *shards):
        assert first + second == batch
        for part in (first, second):  # one group each: a class and its three clique neighbours
            classes = sorted({labels[i] for i in part})
            assert len(classes) == 4 and classes[0] // 4 == classes[-1] // 4


def test_a_batch_that_cannot_be_split_into_whole_classes_is_refused_with_the_numbers() -> None:
    labels = [c for c in range(8) for _ in range(4)]
    with pytest.raises(ValueError, match="3 classes .* over 2 processes"):
        PKBatchSampler(labels, 3, 2, rank=0, world_size=2)
    with pytest.raises(ValueError, match="3 groups of 2 classes .* over 2 processes"):
        HTLBatchSampler(labels, 3, 2, 2, rank=1, world_size=2)
    with pytest.raises(ValueError, match="rank 2"):
        PKBatchSampler(labels, 4, 2, rank=2, world_size=2)


# ------------------------------------------------------------------ loss shares, single process
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_anchor_shares_add_up_to_the_batch_loss(name: str) -> None:
    """Splitting the anchors into blocks and adding the blocks' sums and counts gives the whole batch's loss
    and gradient: what global_batch_loss relies on."""
    features, labels = _data()
    embeddings = features[:, :8].clone().requires_grad_(True)
    loss_fn = _loss(name)
    whole = loss_fn(embeddings, labels)
    (expected,) = torch.autograd.grad(whole, embeddings)
    shares = [loss_fn.terms(embeddings, labels, anchors=rows) for rows in (slice(0, 17), slice(17, None))]
    count = sum(int(share.count) for share in shares)
    combined = sum(share.total for share in shares) / count
    (gradient,) = torch.autograd.grad(combined, embeddings)
    assert combined.item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(gradient, expected, atol=1e-6, rtol=1e-5)


def test_single_process_helpers_are_identities() -> None:
    assert not distributed.launched_by_torchrun() and distributed.world_size() == 1 and distributed.is_main()
    rows = torch.randn(5, 3)
    gathered, own = distributed.all_gather_with_grad(rows)
    assert gathered is rows and own == slice(0, 5)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.choose_backend("auto", torch.device("cpu")) == "gloo"
    assert distributed.choose_backend("auto", torch.device("cuda", 0)) == "nccl"
    with pytest.raises(ValueError, match="needs CUDA"):
        distributed.choose_backend("nccl", torch.device("cpu"))
    model = distributed.convert_sync_batchnorm(_model(batchnorm=True), torch.device("cpu"))
    assert isinstance(model[1], distributed.GlooSyncBatchNorm)
    assert set(model.state_dict()) == set(_model(batchnorm=True).state_dict())


def test_command_line_flags_reach_the_config() -> None:
    from sct.cli import build_parser
    from training.cli import overrides_from
    from training.config import resolve_config

    base = ["train", "--dataset", "folder", "--data-root", "d", "--out", "o"]
    for flags, expected in (
        ([], (False, False, "auto")),
        (["--gather-embeddings", "--sync-bn", "--dist-backend", "nccl"], (True, True, "nccl")),
    ):
        args = build_parser().parse_args(base + flags)
        config = resolve_config("folder", "d", "o", overrides=overrides_from(args))
        assert (config.gather_embeddings, config.sync_batchnorm, config.dist_backend) == expected


# ------------------------------------------------------------------ gradients over two gloo processes
FEATURES, CLASSES, PER_CLASS, P, K = 12, 8, 5, 4, 3
# (loss, gather the embeddings, BatchNorm in the model: synchronised across the processes)
CASES = [(name, True, False) for name in sorted(LOSSES)] + [
    ("hn", False, False),
    ("sct", False, False),
    ("sct", True, True),
    ("sct-warm", True, False),
]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    centres = torch.randn(CLASSES, FEATURES, generator=generator)
    # noisy enough that an anchor's hardest negative is often in another process's share
    return centres[labels] + 1.5 * torch.randn(len(labels), FEATURES, generator=generator), labels


def _model(batchnorm: bool) -> nn.Sequential:
    torch.manual_seed(1)
    norm = [nn.BatchNorm1d(16)] if batchnorm else []
    return nn.Sequential(nn.Linear(FEATURES, 16), *norm, nn.ReLU(), nn.Linear(16, 8))


def _loss(name: str):
    loss_fn = build_loss(
        name.removesuffix("-warm"), lam=1.0, temperature=0.1, hard_threshold=None, margin=0.2, htl_beta=0.1
    )
    if name == "sct-warm":  # part-way through SCT's warm start: EP and SCT blended
        loss_fn.sct_weight = 0.4
    if name == "htl":  # a real tree, so that the margins depend on the (anchor, negative) classes
        features, labels = _data()
        unit = torch.nn.functional.normalize(features[:, :8], dim=1).numpy()
        loss_fn.set_tree(build_tree(unit, labels.numpy(), CLASSES, levels=4, neighbours=3))
    return loss_fn


def _rows(rank: int, world: int) -> list[int]:
    features, labels = _data()
    return next(iter(PKBatchSampler(labels.tolist(), P, K, seed=3, rank=rank, world_size=world)))


def _step(model: nn.Module, trained: nn.Module, name: str, rows: list[int], gather: bool) -> dict:
    """One forward and backward pass of ``trained`` (``model``, or DDP around it) on dataset rows ``rows``."""
    features, labels = _data()
    loss_fn = _loss(name)
    embeddings = trained(features[rows])
    if gather:
        loss = distributed.global_batch_loss(loss_fn, embeddings, labels[rows])
    else:
        loss = loss_fn(embeddings, labels[rows])
    loss.backward()
    return {
        "grads": {key: p.grad.clone() for key, p in model.named_parameters()},
        "loss": float(distributed.all_reduce_sum(loss.detach())) / distributed.world_size(),
        "triplets": loss_fn.stats.triplets,
        "buffers": {key: b.clone() for key, b in model.named_buffers()},
    }


def _gradient_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = []
        for name, gather, batchnorm in CASES:
            model = _model(batchnorm)
            if batchnorm:
                model = distributed.convert_sync_batchnorm(model, torch.device("cpu"))
            trained = distributed.wrap(model, torch.device("cpu"))
            results.append(_step(model, trained, name, _rows(rank, world), gather))
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[list[dict]]:
    out = tmp_path_factory.mktemp("gradients")
    torch.multiprocessing.spawn(_gradient_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    per_rank = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return [list(case) for case in zip(*per_rank)]


@pytest.mark.parametrize(
    "case", range(len(CASES)), ids=[f"{n}-{'gather' if g else 'local'}{'-syncbn' if b else ''}" for n, g, b in CASES]
)
def test_ddp_gradients_equal_one_process(case: int, two_process_results) -> None:
    """With --gather-embeddings, DDP's averaged gradient is the single-process gradient of the global batch's loss.
    Without it each process mines within its own share, and the gradient is the mean of the shares' gradients."""
    name, gather, batchnorm = CASES[case]
    ranks = two_process_results[case]
    shards = [_rows(r, WORLD) for r in range(WORLD)]
    assert [i for shard in shards for i in shard] == _rows(0, 1)
    if gather:
        model = _model(batchnorm)
        expected = _step(model, model, name, _rows(0, 1), gather=False)
        expected_grads, expected_loss = expected["grads"], expected["loss"]
    else:
        shares = []
        for shard in shards:
            model = _model(batchnorm)
            shares.append(_step(model, model, name, shard, gather=False))
        expected_grads = {key: sum(s["grads"][key] for s in shares) / WORLD for key in shares[0]["grads"]}
        expected_loss = sum(s["loss"] for s in shares) / WORLD
    for result in ranks:
        assert result["loss"] == pytest.approx(expected_loss, rel=1e-6, abs=1e-7)
        for key, grad in expected_grads.items():
            torch.testing.assert_close(result["grads"][key], grad, atol=1e-6, rtol=1e-5, msg=key)
    if batchnorm:  # running statistics of the global batch, as one process's BatchNorm keeps them
        for result in ranks:
            for key, buffer in expected["buffers"].items():
                torch.testing.assert_close(result["buffers"][key], buffer, atol=1e-6, rtol=1e-5, msg=key)
    own = [set(range(r * len(shards[0]), (r + 1) * len(shards[0]))) for r in range(WORLD)]
    negatives_elsewhere = sum(
        int(n) not in own[r] for r, result in enumerate(ranks) for _, _, n in result["triplets"].tolist()
    )
    if gather:  # rows of the global batch: anchors are the process's own rows, negatives from anywhere
        assert all(int(a) in own[r] for r, result in enumerate(ranks) for a in result["triplets"][:, 0])
        if name == "hn":
            assert negatives_elsewhere > 0, "the test data should make some hardest negatives cross processes"
    else:  # rows of the process's own share
        assert all(int(i) < len(shards[0]) for result in ranks for i in result["triplets"].flatten())


def test_gathering_changes_the_gradient(two_process_results) -> None:
    """The gather test above is not vacuous: mining across processes changes HN's gradient here."""
    local = two_process_results[CASES.index(("hn", False, False))][0]["grads"]
    gathered = two_process_results[CASES.index(("hn", True, False))][0]["grads"]
    assert any(not torch.allclose(local[key], gathered[key], atol=1e-4) for key in local)


# ------------------------------------------------------------------ sct train under torchrun
# resnet18 from scratch at 16 px with 8-image batches is numerically chaotic: BatchNorm normalises 8 values per
# channel on 1×1 maps, and one process against itself with 1 vs 2 BLAS threads drifts by 1e-2 in loss within four
# steps at lr 0.05. At lr 1e-5 rounding stays near 1e-5, while one step still moves the similarities by ~0.5, so a
# wrong gradient (a missing share, a wrong scale) cannot hide below the tolerance. Plain SGD, not the from-scratch
# AdamW: Adam moves every weight by about lr whatever its gradient's size, so rounding-level differences in tiny
# gradients flip whole steps. No warm start either: it is a share of the run, and this run is extended from one epoch
# to two on resume (the blended loss is checked under DDP by test_ddp_gradients_equal_one_process, "sct-warm").
# The paper's linear head: a BatchNorm over 8 images' 8-d embeddings divides rounding by their spread and takes it
# past 1e-4 (a synchronised BatchNorm1d is checked by test_ddp_gradients_equal_one_process, batchnorm=True).
TRAIN_SETTINGS = dict(
    arch="resnet18",
    pretrained="none",
    dim=8,
    image_size=16,
    batch_size=8,
    images_per_class=2,
    lr=1e-5,
    workers=0,
    device="cpu",
    precision="fp32",
    augment=False,
    eval_every=1,
    triplets_every=2,
    milestones=[],
    gather_embeddings=True,
    sync_batchnorm=True,
    optimizer="sgd",
    momentum=0.0,
    weight_decay=0.0,
    schedule="step",
    warmup_iters=0,
    sct_warmup=0.0,
    embedding_bn=False,
)


def _torchrun_program(*program: str) -> subprocess.CompletedProcess:
    """``program`` (a script and its arguments, or ``-m`` and a module) in WORLD processes under torchrun."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD)]
    command = [*launcher, "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *program]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=150)


def _torchrun(data: Path, run: Path, config_file: Path, *extra: str) -> subprocess.CompletedProcess:
    source = ["--dataset", "folder", "--data-root", str(data), "--out", str(run), "--config", str(config_file)]
    return _torchrun_program("-m", "sct", "train", *source, "--no-progress", *extra)


def _write_settings(path: Path, settings: dict) -> Path:
    """The settings as a YAML file for --config, less those the test passes as flags."""
    path.write_text(
        yaml.safe_dump({k: v for k, v in settings.items() if k not in ("gather_embeddings", "sync_batchnorm")})
    )
    return path


DISTRIBUTED_FLAGS = ("--gather-embeddings", "--sync-bn", "--dist-backend", "gloo")


def _assert_same_run(run: Path, single: Path, lines: int) -> None:
    """Same metrics lines (losses, triplet statistics, class tree, Recall@K), saved triplets and final weights."""
    ours, expected = _metrics(run), _metrics(single)
    assert [m.get("type", "step") for m in ours] == [m.get("type", "step") for m in expected]
    assert [m["iter"] for m in ours] == [m["iter"] for m in expected] and len(ours) == lines
    for a, b in zip(ours, expected):
        for key in ("loss", "hard_fraction", "mean_s_ap", "mean_s_an", "lr", "recall@1", "map@r", "d0"):
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-4), (key, a, b)
    triplet_files = sorted((single / "triplets").glob("*.npz"))
    assert triplet_files and sorted(p.name for p in (run / "triplets").glob("*.npz")) == [p.name for p in triplet_files]
    for path in triplet_files:
        ddp, one = np.load(run / "triplets" / path.name), np.load(path)
        assert np.array_equal(ddp["triplets"], one["triplets"])
        for key in ("s_ap", "s_an", "s_ap_after", "s_an_after"):
            assert np.allclose(ddp[key], one[key], atol=1e-4), key
    state = torch.load(run / "last.pt", weights_only=True)
    reference = torch.load(single / "last.pt", weights_only=True)
    assert state["epoch"] == reference["epoch"] and set(state["model"]) == set(reference["model"])
    for key, value in reference["model"].items():
        assert torch.allclose(state["model"][key].float(), value.float(), atol=1e-4), key


@pytest.mark.slow
def test_torchrun_training_matches_one_process_on_the_same_global_batches(tmp_path: Path) -> None:
    """Two gloo processes with --gather-embeddings --sync-bn, trained for one epoch and then resumed for a second,
    log the same losses, triplets and Recall@K as one process on the same global batches, and end with the same
    weights. Only rank 0 writes (one "run written to", one "resumed from", no doubled metrics lines)."""
    data = _images(tmp_path / "data", classes=8, per_class=4)  # 4 training classes: P = 4, 2 per process
    config_file = _write_settings(tmp_path / "settings.yaml", TRAIN_SETTINGS)
    run = tmp_path / "ddp"
    for extra in (["--epochs", "1"], ["--epochs", "2", "--resume"]):
        result = _torchrun(data, run, config_file, *DISTRIBUTED_FLAGS, *extra)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("run written to") == 1 and result.stdout.count("resumed from") == 1
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["gather_embeddings"] and written["sync_batchnorm"] and written["dist_backend"] == "gloo"

    single = Trainer(_config(data, tmp_path / "single", epochs=2, **TRAIN_SETTINGS), progress=False).fit()
    _assert_same_run(run, single, lines=6)  # 2 epochs × (2 steps + evaluation)


@pytest.mark.slow
def test_torchrun_htl_trains_on_rank_zeros_class_tree(tmp_path: Path) -> None:
    """--loss htl: rank 0 builds the class tree and sends it to the other process; each process keeps whole
    groups of the same global batches, and the epoch matches one process's."""
    data = _images(tmp_path / "data", classes=8, per_class=4)
    settings = dict(TRAIN_SETTINGS, loss="htl", htl_neighbours=2)  # 2 groups of 2 classes × 2 images: one each
    result = _torchrun(
        data,
        tmp_path / "ddp",
        _write_settings(tmp_path / "settings.yaml", settings),
        *DISTRIBUTED_FLAGS,
        "--epochs",
        "1",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("HTL class tree over 4 classes") == 1
    single = Trainer(_config(data, tmp_path / "single", epochs=1, **settings), progress=False).fit()
    _assert_same_run(tmp_path / "ddp", single, lines=4)  # class tree, 2 steps, evaluation


@pytest.mark.slow
def test_torchrun_evaluation_is_shared_and_scores_rank_zeros_model(tmp_path: Path) -> None:
    """Without --sync-bn the processes' BatchNorm statistics drift apart; each process embeds half of the test
    images, with rank 0's statistics, and the Recall@K logged is that of rank 0's checkpoint evaluated alone."""
    import catalog
    from retrieval.metrics import evaluate
    from training.data import embed_records
    from training.export import load_checkpoint_model
    from training.trainer import evaluation_splits, preprocessing_of

    data = _images(tmp_path / "data", classes=8, per_class=5)
    settings = dict(TRAIN_SETTINGS, sync_batchnorm=False)
    result = _torchrun(
        data,
        tmp_path / "ddp",
        _write_settings(tmp_path / "settings.yaml", settings),
        "--dist-backend",
        "gloo",
        "--epochs",
        "1",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logged = [m for m in _metrics(tmp_path / "ddp") if m.get("type") == "eval"]
    assert len(logged) == 1 and logged[0]["queries"] == 20  # 4 test classes × 5 images, each counted once
    model, config = load_checkpoint_model(tmp_path / "ddp" / "last.pt")
    queries, _ = evaluation_splits(catalog.read_dataset("folder", str(data)), "folder")
    embeddings, labels, _ = embed_records(model, queries, preprocessing_of(config), torch.device("cpu"))
    expected = evaluate(embeddings, labels, ks=tuple(config.eval_ks))
    # Rank 0's statistics or not changes the mean similarity by about 0.04; rounding (1 thread per process there,
    # other batch sizes) moves it by about 1e-7, and may swap one near-tied neighbour: one query of 20
    for key in ("recall@1", "recall@2", "map@r"):
        assert logged[0][key] == pytest.approx(expected[key], abs=1 / 20 + 1e-9), key
    unit = embeddings.astype(np.float64)
    sims = unit @ unit.T
    mean_similarity = (sims.sum() - np.trace(sims)) / (len(unit) * (len(unit) - 1))
    assert logged[0]["mean_similarity"] == pytest.approx(mean_similarity, abs=1e-6)


GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")  # the names gloo gives its C++ threads (/proc/…/comm)
LEFT_THREADS_SCRIPT = """
import os, sys
import yaml
from training.config import TrainConfig
from training.trainer import train

train(TrainConfig(**yaml.safe_load(open(sys.argv[1]))), progress=False)
names = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
left = sorted(name for name in names if name.startswith(THREADS))
with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.txt"), "w") as report:  # not stdout: ranks interleave
    report.write(repr(left))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through Linux's /proc")
def test_torchrun_training_leaves_no_gloo_threads_behind(tmp_path: Path) -> None:
    """After train() returns under torchrun, the process group's gloo threads are gone. Were the Trainer kept alive
    by a reference cycle, its DistributedDataParallel would hold them past destroy_process_group(), to be torn down
    during interpreter finalisation, which can abort the process after the run was written."""
    data = _images(tmp_path / "data", classes=8, per_class=4)
    settings = dict(TRAIN_SETTINGS, dataset="folder", data_root=str(data), out=str(tmp_path / "ddp"), epochs=1)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(settings))
    script, reports_dir = tmp_path / "train_then_list_threads.py", tmp_path / "reports"
    reports_dir.mkdir()
    script.write_text(LEFT_THREADS_SCRIPT.replace("THREADS", repr(GLOO_THREADS)))
    result = _torchrun_program(str(script), str(config_file), str(reports_dir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = sorted(path.name for path in reports_dir.iterdir())
    assert reports == [f"rank{rank}.txt" for rank in range(WORLD)], result.stdout[-3000:]
    assert [(reports_dir / name).read_text() for name in reports] == ["[]"] * WORLD
