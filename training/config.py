"""Training settings: the paper's per-dataset defaults (catalog.registry), overridden by a YAML file, then by flags."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

import catalog
from core.cpus import MAX_CPU_TRAINING_WORKERS, MAX_DEFAULT_WORKERS, default_workers
from retrieval.cli_options import DEVICE_HELP, PRECISION_HELP, Device, Precision

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


Loss = Literal["sct", "hn", "shn", "ep", "batch-all", "htl"]
Arch = Literal["resnet18", "resnet34", "resnet50"]
TrunkStages = Literal[4, 3, 2]
LastStride = Literal[2, 1]
Optimizer = Literal["sgd", "adamw"]
Schedule = Literal["step", "cosine"]
WarmLoss = Literal["ep", "shn"]  # what SCT's warm start blends in (training.losses.SCTLoss)
ValBy = Literal["auto", "classes", "images"]
DistBackend = Literal["auto", "nccl", "gloo"]


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    factory: Callable[[], Any] | None = None,
    flag: str | None = None,
    metavar: str | None = None,
    at_least: int | None = None,
) -> Any:
    """A ``TrainConfig`` field that `sct train` takes as a flag (training.cli builds it from the field):
    ``--NAME-WITH-DASHES`` unless ``flag`` names it; the type, the choices (a ``Literal``) and nargs (a list)
    come from the annotation; ``at_least``: the smallest whole number the flag accepts."""
    metadata = {
        "help": help,
        **{
            key: value
            for key, value in (("flag", flag), ("metavar", metavar), ("at_least", at_least))
            if value is not None
        },
    }
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """A run's settings. A field made with ``setting`` is also a flag of `sct train`; the others are not."""

    dataset: str
    data_root: str
    out: str
    loss: Loss = setting(
        "sct",
        help="sct (default); baselines: hn, shn, ep (easy positive), batch-all (triplet "
        "margin), htl (hierarchical triplet loss, Ge et al. 2018)",
    )
    arch: Arch = setting("resnet50", help="backbone")
    dim: int = setting(64, help="embedding size", at_least=1)
    # A BatchNorm on the embedding, before L2 normalisation (training.model.EmbeddingNet): centres a from-scratch
    # network's embeddings, which otherwise start in one narrow cone
    embedding_bn: bool = setting(
        False,
        help="a BatchNorm on the embedding before L2 normalisation (default: on "
        "with --pretrained none, where it keeps a random network's embeddings "
        "from starting in one narrow cone; off with pretrained weights, as in "
        "the paper)",
    )
    # The feature grid (heatmap cells) is image_size / stride on a side; the stride is 32 for a whole ResNet,
    # halved by dropping the last stage and halved again by a last stride of 1 (training.model.EmbeddingNet)
    trunk_stages: TrunkStages = setting(
        4,
        help="ResNet stages kept: 4 (all, as in the paper), 3 or 2; each stage dropped halves the output stride "
        "(the feature grid is twice as fine on a side) and the features",
    )
    last_stride: LastStride = setting(
        2,
        help="stride of the last kept stage: 2 (torchvision's), or 1 for a feature grid twice as fine on a side "
        "(sharper similarity heatmaps, as re-identification models do), at more compute in that stage",
    )
    image_size: int = setting(256, help="training and evaluation crop size in pixels", at_least=1)
    epochs: int = setting(80, help="training epochs", at_least=1)
    batch_size: int = setting(128, help="images per batch (P classes × K images)", at_least=1)
    images_per_class: int = setting(2, help="K in the P×K batch (paper: 2)", metavar="K", at_least=2)
    lr: float = setting(0.009, help="learning rate")
    optimizer: Optimizer = setting("sgd", help="the paper's SGD (default) or AdamW")
    momentum: float = setting(0.0, help="SGD momentum, at least 0 and below 1")
    weight_decay: float = setting(0.0, help="weight decay")
    # "step": MultiStepLR at milestones·epochs; "cosine": cosine decay per iteration
    schedule: Schedule = setting(
        "step", help="learning-rate schedule: step (×gamma at the milestones) or cosine " "(decay per iteration)"
    )
    milestones: list[float] = field(default_factory=lambda: [0.5])
    gamma: float = setting(0.1, help="the step schedule's factor at each milestone")
    warmup_iters: int = setting(0, help="iterations of linear learning-rate warm-up", metavar="N", at_least=0)
    lam: float = setting(1.0, help="SCT's λ on hard triplets")
    temperature: float = setting(0.1, help="NCA temperature τ (default 0.1)")
    hard_threshold: float | None = setting(
        None, metavar="T", help="--loss sct: also treat S_an > T as hard (the " "official code uses 0.8)"
    )
    # SCT: a triplet is hard only if also S_an > this (the official 2020 rule: 0.5)
    hard_floor: float | None = setting(
        None,
        metavar="F",
        help="--loss sct: a triplet is hard only if also S_an > F " "(the official code's 2020 version: 0.5)",
    )
    # SCT's warm start (training.losses.SCTLoss): over this first share of the run, each anchor's loss moves from a
    # loss that pulls positives in (sct_warm_loss: "ep" or "shn") to SCT's; 0: the paper's SCT from the start.
    sct_warmup: float = setting(
        0.0,
        metavar="SHARE",
        help="--loss sct: over this first share of the run (0 to 1), "
        "each anchor's loss moves from a loss that pulls positives in (--sct-warm-loss) to "
        "SCT's; 0: the paper's SCT throughout",
    )
    sct_warm_loss: WarmLoss = setting(
        "ep", help="--loss sct: the loss the warm start blends in (default ep: " "Easy-Positive NCA)"
    )
    margin: float = setting(0.2, help="margin of --loss batch-all (default 0.2)")  # batch-all triplet loss only
    # Hierarchical Triplet Loss (--loss htl; Ge et al., ECCV 2018). A batch is l′ groups of
    # m = htl_neighbours classes (a random class and its m − 1 nearest) × images_per_class (t) images, so
    # batch_size must be a multiple of m·t; l′ = batch_size // (m·t). The paper trained with larger batches
    # and its own per-dataset settings; we keep each dataset's defaults (SCT's batch, lr, schedule) so that
    # HTL is compared with SCT/SHN/HN under one recipe, and only the loss and the sampler change.
    # L: levels of the class tree; level l merges classes closer than l·(4 − d0)/L + d0
    htl_levels: int = setting(16, metavar="L", help="--loss htl: levels of the class tree (default 16)", at_least=1)
    # β in the dynamic margin α = max(β + d_H(y_a, y_n) − s_{y_a}, 0)
    htl_beta: float = setting(
        0.1, metavar="B", help="--loss htl: β in the margin α = β + d_H(ya,yn) − s_ya " "(default 0.1)"
    )
    # m: classes per group, the group's own class included
    htl_neighbours: int = setting(
        4,
        metavar="M",
        at_least=1,
        help="--loss htl: classes per group, a random class and its M − 1 nearest "
        "(default 4); the batch size must be a multiple of M × images per class",
    )
    # epochs between rebuilds of the class tree; 0 = built once, before epoch 1
    htl_rebuild_every: int = setting(
        1,
        metavar="EPOCHS",
        at_least=0,
        help="--loss htl: rebuild the class tree every N epochs (default 1; 0: once, " "at the start)",
    )
    # embed at most this many images per class for the tree; None: all
    htl_tree_images_per_class: int | None = setting(
        None,
        metavar="N",
        at_least=2,
        help="--loss htl: embed at most N images per class to build " "the tree (default: all)",
    )
    # random crop from 1.1× and horizontal flip, as in the paper; False: the eval transform
    augment: bool = setting(
        True, help="random crop from 1.1× and horizontal flip (the paper's; default on, off " "for the demo)"
    )
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    pretrained: str = setting(
        "imagenet",
        metavar="imagenet|none|PATH",
        help="how the network starts, which also picks the recipe "
        "(docs/hard-negatives/ZERO_SHOT.md): imagenet (torchvision's cached weights), "
        "none (from scratch: its own defaults), or PATH: a torchvision state dict or an "
        "`sct train` checkpoint, whose trunk is loaded (a checkpoint of a run from scratch keeps "
        "the from-scratch defaults)",
    )
    device: Device = setting("auto", help=DEVICE_HELP)
    precision: Precision = setting("auto", help=PRECISION_HELP)
    # torch.compile the training forward and backward (a minute or two to compile first)
    compile: bool = setting(
        False,
        help="torch.compile the training step's model (default off: compiling costs a "
        "minute or two first; see benchmarks/results/gpu_speed.md for what it gains)",
    )
    seed: int = setting(0, help="random seed")
    # epochs between Recall@K evaluations on the test split; 0 = only at the end
    eval_every: int = setting(1, metavar="EPOCHS", at_least=0, help="evaluate every N epochs (0: at the end)")
    # > 0: hold out this share of the training split and evaluate on it instead of test
    val_fraction: float = setting(
        0.0,
        metavar="F",
        help="hold out this share of the training split and evaluate "
        "on it instead of the test split (for tuning; default 0: "
        "evaluate on test)",
    )
    # "classes", "images", or "auto" (images when train and test share their classes)
    val_by: ValBy = setting(
        "auto",
        help="hold out whole classes or images of every class (auto: images when train "
        "and test share their classes, as in Fashion-MNIST)",
    )
    eval_ks: list[int] = setting(  # resolved: the dataset's Ks
        factory=lambda: list(catalog.DEFAULT_KS),
        metavar="K",
        at_least=1,
        help="K of the logged Recall@K, the first choosing best.pt (default: the dataset's, as in sct eval: "
        "1 10 20 30 40 for inshop, 1 10 100 for hotels50k, else 1 2 4 8)",
    )
    # resolved: this process's share of the usable CPUs less 2 (core.cpus.default_workers), at most 16 on CUDA and
    # 4 on the CPU
    workers: int = setting(
        4,
        metavar="N",
        at_least=0,
        help="data-loading processes (0: load in the training " "process; default: this process's share of the CPUs)",
    )
    cache_images: bool = False  # keep preprocessed training images in memory; only with augment: false, workers: 0
    # save sampled (S_ap, S_an) pairs every N iterations; 0 = never
    triplets_every: int = setting(
        100, metavar="N", at_least=0, help="log sampled (S_ap, S_an) pairs every N iterations (0: never)"
    )
    max_iters_per_epoch: int | None = setting(
        None, metavar="N", at_least=1, help="cap iterations per epoch (quick runs)"
    )  # cap for quick runs, tests
    # Several processes (launched by torchrun; docs/DISTRIBUTED.md). batch_size is the global batch, split into
    # whole classes over the processes. Without torchrun these three settings change nothing.
    # mine positives and negatives from the global batch, not each process's share
    gather_embeddings: bool = setting(
        False,
        help="under torchrun: mine positives and negatives from the global "
        "batch (all processes' embeddings), with gradients equal to one "
        "process training on that batch; default: each process mines "
        "within its own share",
    )
    # BatchNorm statistics over the global batch (SyncBatchNorm)
    sync_batchnorm: bool = setting(
        False, flag="--sync-bn", help="under torchrun: BatchNorm statistics over the " "global batch (SyncBatchNorm)"
    )
    # "auto" (nccl on CUDA, gloo on CPU), "nccl" or "gloo"
    dist_backend: DistBackend = setting(
        "auto", help="under torchrun: process-group backend (auto: nccl on CUDA, " "gloo on CPU)"
    )
    # Under torchrun on CUDA: more processes than GPUs on a node share them (local rank modulo the GPU count) and
    # talk over gloo, since NCCL refuses two processes on one GPU. For checking DDP on a one-GPU machine; off by
    # default, so that each process having its own GPU stays a checked requirement.
    share_gpus: bool = setting(
        False,
        help="under torchrun on CUDA: let more processes than GPUs share them, over gloo (for checking DDP on one GPU)",
    )
    # Reproducible arithmetic for comparing runs (DDP against one GPU): fp32 only, no TF32, deterministic cuDNN and
    # cuBLAS, torch.use_deterministic_algorithms (training.precision.make_deterministic). Slower; needs fp32.
    deterministic: bool = setting(
        False,
        help="deterministic fp32 arithmetic on CUDA (cuDNN, cuBLAS, no TF32) for comparing runs; needs --precision "
        "fp32; slower",
    )
    # Not a setting: the layer of resolve_config that set each setting it set ("dataset:cub", "flag", ...); the
    # others have their default. Saved in config.yaml and checkpoints; a --config file's own is ignored.
    provenance: dict[str, str] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)


def choices_of(name: str) -> tuple[str, ...] | None:
    """The values setting ``name`` may take, from its ``Literal`` type; None for a setting of another type."""
    kind = get_type_hints(TrainConfig)[name]
    return get_args(kind) if get_origin(kind) is Literal else None


# Per-loss settings over every dataset's defaults; a dataset's own "losses" entry and explicit settings win.
# HTL estimates within-class distances and class neighbours from each batch's groups, which K = 2 starves:
# 4 images per class gives l′ = batch / 16 groups of m = 4 classes (8 groups for CUB and Cars, 32 for SOP).
LOSS_DEFAULTS: dict[str, dict[str, Any]] = {"htl": dict(images_per_class=4)}

# With SGD, the learning rate of a baseline loss as a multiple of the dataset's (SCT's) learning rate.
# SCT's hard triplets push with λ·S_an, about 1/τ = 10 times more weakly than NCA, and give the positive
# nothing, so SCT needs the larger step: the official code's grid put SCT's best learning rate 3-5 times
# SHN's on CUB and Cars (pretrained ResNet-50, K = 2). A dataset's optimiser entry may override these
# ("lr_factors"), as Fashion-MNIST's does from its own tuning (docs/hard-negatives/README.md).
SGD_LR_FACTORS: dict[str, float] = {"hn": 0.25, "shn": 0.25}

#: Each dataset's training preset, by name: the paper's settings (and its official code's), held with the rest of
#: what is known of the dataset in catalog.registry; a read-only view of ``catalog.spec(name).training_preset``.
DATASET_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {name: entry.training_preset for name, entry in catalog.REGISTRY.items()}
)


# Per start (how the network's weights begin: ``pretrained``), over the dataset's settings. The dataset presets are
# recipes for a pretrained trunk (ImageNet weights, or a file of them: --pretrained PATH), the paper's setting.
# From scratch ("none") nearly every triplet starts hard and those recipes barely learn; this recipe was chosen
# on the zero-shot sets of benchmarks/zero_shot_sets.py (docs/hard-negatives/ZERO_SHOT.md). A dataset whose own
# preset already starts from scratch (Fashion-MNIST) keeps its own tuned recipe.
START_DEFAULTS: dict[str, dict[str, Any]] = {
    "none": dict(
        # A BatchNorm on the embedding keeps a random network's embeddings from starting in one narrow cone. With it,
        # on the glyphs set, SCT, SHN and HN were each best at lr 0.002 of those tried, and HTL at 0.001
        optimizer="adamw",
        lr=0.002,
        weight_decay=1e-4,
        momentum=0.0,
        schedule="cosine",
        warmup_iters=50,
        augment=False,
        embedding_bn=True,
        # SCT: a blend from Easy-Positive into SCT over the whole run
        losses=dict(sct=dict(sct_warmup=1.0, sct_warm_loss="ep")),
        lr_factors=dict(htl=0.5),
        # --optimizer sgd from scratch: momentum and weight decay, one learning rate for every loss
        sgd=dict(lr=0.03, momentum=0.9, weight_decay=5e-4, lr_factors=dict(hn=1.0, shn=1.0)),
    ),
}


def start_of(pretrained: str, _depth: int = 0) -> str:
    """How training starts: "none" (from scratch), "imagenet", or "file" (--pretrained PATH).

    A PATH that is a checkpoint of `sct train` whose own run started from scratch (directly, or through such
    checkpoints) counts as "none": fine-tuned on emoji from a trunk trained on glyphs, the from-scratch recipe
    reached Recall@1 0.683 and the pretrained-trunk one 0.309 (docs/hard-negatives/ZERO_SHOT.md). Any other file
    (a torchvision state dict, a checkpoint of a run from ImageNet weights) is in the ImageNet regime.
    """
    if pretrained in ("none", "imagenet"):
        return pretrained
    origin = _checkpoint_start(pretrained) if _depth < 8 else None
    return "none" if origin is not None and start_of(origin, _depth + 1) == "none" else "file"


def _checkpoint_start(path: str) -> str | None:
    """The ``pretrained`` setting of the run that wrote checkpoint ``path``; None for anything else (no file, a
    state dict); what is wrong with the file is for the model builder to say."""
    if not Path(path).is_file():
        return None
    import torch  # only for --pretrained PATH: resolving a config otherwise needs no torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch file: build_model names the problem
        return None
    config = state.get("config") if isinstance(state, dict) else None
    origin = config.get("pretrained") if isinstance(config, dict) else None
    return origin if isinstance(origin, str) else None


# A run's config.yaml holds these too; given back as --config, they are ignored: the command line says them.
NOT_FROM_FILE = ("dataset", "data_root", "out", "provenance")


def resolve_config(
    dataset: str,
    data_root: str,
    out: str,
    *,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    cuda_available: bool = False,
) -> TrainConfig:
    """Dataset defaults (``catalog.spec_or_folder(dataset).training_preset``; an unregistered name gets the
    folder's) ← device defaults ← start defaults (``START_DEFAULTS``, when ``pretrained`` differs from the
    dataset's own) ← optimiser defaults ← per-loss defaults (``LOSS_DEFAULTS``, then the dataset's or the start's
    "losses" entry) ← per-loss learning rate ← YAML ``config_file`` ← ``overrides`` (None ignored).

    The preset's learning rate is SCT's. With no learning rate given, a baseline loss gets its own: SCT's times
    its factor for the optimiser (with SGD ``SGD_LR_FACTORS[loss]``, docs/hard-negatives/README.md explains why;
    a preset or its optimiser entry may give its own "lr_factors"). ``config.provenance`` names the layer that
    set each setting.
    """
    preset: dict[str, Any] = dict(catalog.spec_or_folder(dataset).training_preset)
    cpu_settings = preset.pop("cpu", {})
    per_optimizer = {name: preset.pop(name, {}) for name in OPTIMIZERS}
    per_loss = preset.pop("losses", {})
    settings: dict[str, Any] = {}
    provenance: dict[str, str] = {}

    def apply(layer: str, values: Mapping[str, Any]) -> None:
        settings.update(values)
        provenance.update(dict.fromkeys(values, layer))

    apply(f"dataset:{dataset}", {"eval_ks": list(catalog.recall_ks(dataset)), **preset})
    device = (overrides or {}).get("device") or "auto"
    on_cpu = device == "cpu" or (device == "auto" and not cuda_available)
    if on_cpu:
        apply("cpu", cpu_settings)
    if "workers" not in settings:  # the process's share of the CPUs; a GPU eats images fast, so up to 16 there
        apply(
            "usable cpus", {"workers": default_workers(cap=MAX_CPU_TRAINING_WORKERS if on_cpu else MAX_DEFAULT_WORKERS)}
        )
    from_file = {
        k: v for k, v in (_read_yaml(Path(config_file)) if config_file else {}).items() if k not in NOT_FROM_FILE
    }
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    explicit = {**from_file, **flags}
    factors = {"sgd": dict(SGD_LR_FACTORS)}  # per optimizer: a baseline loss's learning rate over SCT's
    start = start_of(explicit.get("pretrained", settings.get("pretrained", TrainConfig.pretrained)))
    if start != start_of(settings.get("pretrained", TrainConfig.pretrained)) and start in START_DEFAULTS:
        start_preset = dict(START_DEFAULTS[start])  # the dataset's recipe is for another start
        per_optimizer = {name: start_preset.pop(name, {}) for name in OPTIMIZERS}
        per_loss = start_preset.pop("losses", {})
        factors[start_preset.get("optimizer", TrainConfig.optimizer)] = start_preset.pop("lr_factors", {})
        apply(f"start:{start}", start_preset)
        layer_of_optimizer, layer_of_loss = f"start:{start}:optimizer", f"start:{start}:loss"
    else:
        layer_of_optimizer, layer_of_loss = "optimizer", "loss"
    optimizer = explicit.get("optimizer", settings.get("optimizer", TrainConfig.optimizer))
    if optimizer != settings.get("optimizer", TrainConfig.optimizer):
        chosen = dict(per_optimizer.get(optimizer, {}))
        factors[optimizer] = {**factors.get(optimizer, {}), **chosen.pop("lr_factors", {})}
        apply(f"{layer_of_optimizer}:{optimizer}", chosen)
    lr_factors = factors.get(optimizer, {})
    loss = explicit.get("loss", settings.get("loss", TrainConfig.loss))
    apply(f"loss:{loss}", LOSS_DEFAULTS.get(loss, {}))
    apply(f"{layer_of_loss}:{loss}", per_loss.get(loss, {}))
    if "lr" not in explicit and loss in lr_factors:
        settings["lr"] = settings.get("lr", TrainConfig.lr) * lr_factors[loss]
        provenance["lr"] = f"{provenance.get('lr', 'default')} * lr_factor:{loss}"
    apply("config-file", from_file)
    apply("flag", flags)
    known = {f.name for f in dataclasses.fields(TrainConfig)} - set(NOT_FROM_FILE)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(sorted(known))}")
    config = TrainConfig(dataset=dataset, data_root=data_root, out=out, provenance=provenance, **settings)
    _validate(config)
    return config


#: The settings `sct train` shows at the start with the layer that set them (and SCT's warm start for SCT).
KEY_SETTINGS = ("pretrained", "embedding_bn", "lr", "optimizer", "batch_size", "epochs", "schedule")


def describe_provenance(config: TrainConfig, names: tuple[str, ...] | None = None) -> str:
    """One line per setting: ``name: value  (layer)``, the layer "default" when none set it."""
    if names is None:
        names = KEY_SETTINGS + (("sct_warmup",) if config.loss == "sct" else ())
    return "\n".join(f"  {name}: {getattr(config, name)}  ({config.provenance.get(name, 'default')})" for name in names)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path}: expected a mapping of setting: value, got {type(loaded).__name__}")
    return {key: _as_float_if_expected(path, key, value) for key, value in loaded.items()}


_FLOAT_SETTINGS = {f.name for f in dataclasses.fields(TrainConfig) if str(f.type).startswith("float")}


def _as_float_if_expected(path: Path, key: str, value: Any) -> Any:
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; a float setting accepts it, or names the bad value."""
    if key not in _FLOAT_SETTINGS or not isinstance(value, str):
        return value
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--config {path}: {key} must be a number, got {value!r}") from None


_AT_LEAST_0 = (lambda v: 0 <= v < math.inf, "a finite number at least 0")
_ABOVE_0 = (lambda v: 0 < v < math.inf, "a finite number above 0")
_BELOW_1 = (lambda v: 0 <= v < 1, "at least 0 and below 1")
_COUNT = (lambda v: isinstance(v, int) and v >= 0, "a whole number at least 0")
_POSITIVE_COUNT = (lambda v: isinstance(v, int) and v >= 1, "a whole number at least 1")

#: What each numeric setting accepts (None, where allowed, is not checked). NaN fails every comparison.
_NUMBER_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": _AT_LEAST_0,  # 0 measures the untrained network
    "weight_decay": _AT_LEAST_0,
    "lam": _AT_LEAST_0,
    "margin": _AT_LEAST_0,
    "gamma": _ABOVE_0,
    "temperature": _ABOVE_0,
    "momentum": _BELOW_1,
    "val_fraction": _BELOW_1,
    "sct_warmup": (lambda v: 0 <= v <= 1, "between 0 and 1 (a share of the run)"),
    "hard_threshold": (math.isfinite, "a finite number"),
    "hard_floor": (math.isfinite, "a finite number"),
    "epochs": _POSITIVE_COUNT,
    "batch_size": _POSITIVE_COUNT,
    "image_size": _POSITIVE_COUNT,
    "dim": _POSITIVE_COUNT,
    "max_iters_per_epoch": _POSITIVE_COUNT,
    "images_per_class": (lambda v: isinstance(v, int) and v >= 2, "a whole number at least 2 (anchor and positive)"),
    "warmup_iters": _COUNT,
    "eval_every": _COUNT,
    "workers": _COUNT,
    "triplets_every": _COUNT,
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _all(values: Any, accepts: Callable[[Any], bool]) -> bool:
    """``values`` is a list of numbers that ``accepts`` takes (a YAML file may give anything)."""
    return isinstance(values, list) and all(_is_number(v) and accepts(v) for v in values)


def _validate_numbers(config: TrainConfig) -> None:
    for name, (accepts, expected) in _NUMBER_RULES.items():
        value = getattr(config, name)
        if value is not None and not (_is_number(value) and accepts(value)):
            raise ValueError(f"{name} must be {expected}, got {value!r}")
    if not _all(config.milestones, lambda m: 0 < m < 1):
        raise ValueError(
            f"milestones must be fractions of the epochs, each above 0 and below 1, " f"got {config.milestones!r}"
        )
    if not (config.eval_ks and _all(config.eval_ks, lambda k: isinstance(k, int) and k >= 1)):
        raise ValueError(f"eval_ks must be whole numbers at least 1, got {config.eval_ks!r}")
    if not _all(config.std, lambda v: 0 < v < math.inf):
        raise ValueError(f"std must be finite numbers above 0 (pixels are divided by them), got {config.std!r}")


def _validate(config: TrainConfig) -> None:
    _validate_numbers(config)
    if config.batch_size % config.images_per_class:
        raise ValueError(
            f"batch size {config.batch_size} is not a multiple of images per class {config.images_per_class}"
        )
    for setting_field in dataclasses.fields(TrainConfig):
        choices = choices_of(setting_field.name)
        value = getattr(config, setting_field.name)
        if choices is not None and value not in choices:
            raise ValueError(f"{setting_field.name} must be one of {', '.join(choices)}, not {value!r}")
    if config.deterministic and config.precision != "fp32":
        raise ValueError(
            f"deterministic needs precision fp32 (bf16 autocast rounds differently), not {config.precision}"
        )
    if config.loss == "htl":
        _validate_htl(config)


def _validate_htl(config: TrainConfig) -> None:
    for name in ("htl_levels", "htl_neighbours"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.htl_beta < 0:
        raise ValueError(f"htl_beta must be at least 0, got {config.htl_beta}")
    if config.htl_rebuild_every < 0:
        raise ValueError(
            f"htl_rebuild_every must be at least 0 (0: build the tree once), got {config.htl_rebuild_every}"
        )
    if config.htl_tree_images_per_class is not None and config.htl_tree_images_per_class < 2:
        raise ValueError(
            "htl_tree_images_per_class must be at least 2 (a within-class distance needs two images), "
            f"got {config.htl_tree_images_per_class}"
        )
    group = config.htl_neighbours * config.images_per_class
    if config.batch_size % group:
        raise ValueError(
            f"--loss htl: batch size {config.batch_size} is not a multiple of htl_neighbours × images_per_class "
            f"= {config.htl_neighbours} × {config.images_per_class} = {group}"
        )


def load_config_file(path: Path) -> TrainConfig:
    """Read back a run's config.yaml."""
    return TrainConfig(**_read_yaml(path))
