"""The one table of datasets: per name, its reader, its splits, its Recall@K table and its training preset.

`sct index` (the split it embeds), `sct eval` (the Ks), `sct train` (the preset and the Ks it logs) and the
evaluation during training (the queries and the gallery) all look a dataset up here, so what one of them
treats as the gallery or reports at which K cannot drift from the others. Plain data: nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from catalog.cars import read_cars
from catalog.cub import read_cub
from catalog.fashion_mnist import read_fashion_mnist
from catalog.folder import read_folder
from catalog.hotels50k import read_hotels50k
from catalog.inshop import read_inshop
from catalog.records import ImageRecord
from catalog.sop import read_sop
from core.errors import UserValueError

#: The Ks of the metric-learning papers' Recall@K tables (CUB, Cars, SOP), and of any dataset without its own.
DEFAULT_KS = (1, 2, 4, 8)

#: (query split, gallery split); no gallery split: leave-one-out over the query split
Protocol = tuple[str, str | None]


@dataclass(frozen=True)
class LabelSet:
    """A second labelling of the same images, an ImageRecord field, scored with Recall@K at Ks of its own."""

    field: str
    ks: tuple[int, ...]


#: Hotels-50K's hotel chains: its paper reports chain Recall@1/3/5 besides hotel (instance) recall.
CHAIN_LABELS = LabelSet("chain", (1, 3, 5))


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """Everything the commands need to know about one dataset.

    ``gallery_split`` None means the benchmark's protocol is leave-one-out over ``query_split``: every query
    image searches the others of its split, which is then also the split `sct index` embeds; otherwise
    `sct eval --queries-split` takes ``query_split``. ``other_protocols`` are tried, in order, when the
    records lack the benchmark's splits: a folder's split.csv may lay out In-shop's or Hotels-50K's protocol
    instead of a test split. ``train_split`` is "train" for every dataset, the split the trainer and
    catalog.validation read.
    ``training_preset`` is the paper's recipe (``training.config.resolve_config`` reads it): settings, plus
    "cpu", "sgd"/"adamw" and "losses" entries that replace them on a CPU, with that optimiser, for that loss.
    """

    name: str
    reader: Callable[[Path], list[ImageRecord]]
    training_preset: dict[str, Any] = field(hash=False)
    train_split: str = "train"
    query_split: str = "test"
    gallery_split: str | None = None
    recall_ks: tuple[int, ...] = DEFAULT_KS
    extra_label_sets: tuple[LabelSet, ...] = ()
    other_protocols: tuple[Protocol, ...] = ()

    def __post_init__(self) -> None:
        if not callable(self.reader):
            raise ValueError(f"dataset {self.name!r}: reader must be callable, got {self.reader!r}")
        if not isinstance(self.training_preset, dict) or not self.training_preset:
            raise ValueError(f"dataset {self.name!r}: training_preset must be a non-empty dict of settings")
        record_fields = {f.name for f in fields(ImageRecord)}
        for ks in (self.recall_ks, *(labels.ks for labels in self.extra_label_sets)):
            if not ks or not all(isinstance(k, int) and k >= 1 for k in ks):
                raise ValueError(f"dataset {self.name!r}: Ks must be whole numbers at least 1, got {ks!r}")
        for labels in self.extra_label_sets:
            if labels.field not in record_fields:
                raise ValueError(f"dataset {self.name!r}: label set {labels.field!r} is no ImageRecord field")
        for query, gallery in self.protocols:
            if query == gallery:
                raise ValueError(
                    f"dataset {self.name!r}: split {query!r} cannot be both queries and gallery; "
                    "leave-one-out over it is gallery None"
                )

    @property
    def protocols(self) -> tuple[Protocol, ...]:
        """The benchmark's (query split, gallery split) first, then the alternatives."""
        return ((self.query_split, self.gallery_split), *self.other_protocols)

    @property
    def index_split(self) -> str:
        """The split `sct index` embeds by default: the gallery, which under leave-one-out is the query split."""
        return self.gallery_split or self.query_split

    def evaluation_splits(self, records: list[ImageRecord]) -> tuple[list[ImageRecord], list[ImageRecord] | None]:
        """(queries, gallery) of ``records`` under the first protocol whose splits they have, as the evaluation
        during training takes them; gallery None means leave-one-out over the queries; ([], None) when no
        protocol fits (nothing to evaluate on)."""
        by_split: dict[str, list[ImageRecord]] = {}
        for record in records:
            by_split.setdefault(record.split, []).append(record)
        for query_split, gallery_split in self.protocols:
            if not by_split.get(query_split):
                continue
            if gallery_split is None:
                return by_split[query_split], None
            if by_split.get(gallery_split):
                return by_split[query_split], by_split[gallery_split]
        return [], None


SPECS: tuple[DatasetSpec, ...] = (
    # The paper's settings (and its official code's); "cpu" entries replace them where no GPU is present, and an
    # "sgd" or "adamw" entry replaces them when that optimiser is chosen instead of the dataset's own.
    DatasetSpec(
        name="cub",
        reader=read_cub,
        training_preset=dict(
            dim=64,
            batch_size=128,
            lr=0.009,
            lam=1.0,
            epochs=80,
            milestones=[0.5],
            mean=[0.4707, 0.4601, 0.4549],
            std=[0.2767, 0.2760, 0.2850],
        ),
    ),
    DatasetSpec(
        name="cars",
        reader=read_cars,
        training_preset=dict(dim=64, batch_size=128, lr=0.02, lam=1.0, epochs=80, milestones=[0.5]),
    ),
    DatasetSpec(
        name="sop",
        reader=read_sop,
        training_preset=dict(dim=512, batch_size=512, lr=0.03, lam=0.1, epochs=200, milestones=[0.5, 0.75]),
    ),
    DatasetSpec(
        name="inshop",
        reader=read_inshop,
        query_split="query",
        gallery_split="gallery",
        recall_ks=(1, 10, 20, 30, 40),
        training_preset=dict(dim=512, batch_size=512, lr=0.1, lam=0.1, epochs=200, milestones=[0.5, 0.75]),
    ),
    DatasetSpec(
        # The gallery is the training set: test photos of a hotel are searched among its training photos
        name="hotels50k",
        reader=read_hotels50k,
        query_split="query",
        gallery_split="train",
        recall_ks=(1, 10, 100),
        extra_label_sets=(CHAIN_LABELS,),
        training_preset=dict(dim=256, batch_size=512, lr=0.1, lam=0.1, epochs=200, milestones=[0.5, 0.75]),
    ),
    DatasetSpec(
        name="folder",
        reader=read_folder,
        other_protocols=(("query", "gallery"), ("query", "train")),
        training_preset=dict(dim=64, batch_size=128, lr=0.009, lam=1.0, epochs=80, milestones=[0.5]),
    ),
    DatasetSpec(
        name="fashion-mnist",
        reader=read_fashion_mnist,
        # The demo: a small ResNet from scratch at 32 px. Tuned on CPU for a 5-minute budget
        # (benchmarks/results/demo.md): AdamW, no crop/flip augmentation, and all 10 classes in every batch
        # (P = 10, K = 12) learn fastest.
        training_preset=dict(
            arch="resnet18",
            # The first two stages only: output stride 8, so 32 px crops give a 4×4 feature grid whose similarity
            # heatmaps show which parts match (the whole network's stride 32 left one cell). On 2 CPU cores it
            # also trained about 4 times faster and reached a higher Recall@1 than the whole network
            # (benchmarks/results/demo_layouts.md)
            trunk_stages=2,
            last_stride=2,
            pretrained="none",
            dim=128,
            image_size=32,
            epochs=12,
            batch_size=120,
            images_per_class=12,
            optimizer="adamw",
            lr=0.001,
            weight_decay=1e-4,
            schedule="cosine",
            warmup_iters=100,
            augment=False,
            lam=1.0,
            mean=[0.2860] * 3,
            std=[0.3530] * 3,
            workers=2,
            eval_every=0,
            triplets_every=50,
            losses=dict(htl=dict(images_per_class=12, htl_neighbours=5)),  # 120 = l′ 2 groups × m 5 classes × t 12
            # --optimizer sgd: the paper's SGD (momentum 0), tuned on a validation split for HN, SHN and SCT alike
            # (docs/hard-negatives/README.md): all three peaked at lr 0.3, so no per-loss factor here.
            sgd=dict(lr=0.3, momentum=0.0, weight_decay=0.0, lam=1.0, lr_factors=dict(hn=1.0, shn=1.0)),
            cpu=dict(epochs=3, max_iters_per_epoch=450, workers=0, cache_images=True),  # about 5 minutes on 2 cores
        ),
    ),
)

#: dataset name -> its spec, in SPECS order; read-only, so that no command can add a name the others lack
REGISTRY: Mapping[str, DatasetSpec] = MappingProxyType({s.name: s for s in SPECS})

#: The spec of names outside the registry where a default is wanted: a gallery of an image folder
#: ("image-folder") or without a dataset in its manifest is evaluated, and a run resolved, like a folder.
FALLBACK = "folder"


def spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name``; ValueError naming the valid names for any other."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UserValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(REGISTRY))}") from None


def spec_or_folder(name: str) -> DatasetSpec:
    """The spec of ``name``, or the folder's (``FALLBACK``) for a name outside the registry."""
    return REGISTRY.get(name, REGISTRY[FALLBACK])
