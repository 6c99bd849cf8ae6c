"""Triplet losses mined from a P×K batch (Xuan et al., ECCV 2020, and baselines).

Every loss shares one selection of triplets from the batch cosine-similarity
matrix: the anchor itself is excluded, the positive is the most similar other
image of the anchor's class, the negative is the most similar image of another
class. Selection runs on detached similarities; the loss uses the live ones.
The batch loss is the mean over anchors that have both a positive and a
negative.

Each loss is computed as a sum of terms and the number of terms it is the mean
over (``LossTerms``), for anchors that may be only some rows of the batch: a
process of a distributed run takes its own rows of the gathered global batch
as anchors, every row as positive or negative, and the processes add up their
sums and counts (``training.distributed.global_batch_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import Loss, WarmLoss
from training.htl import ClassTree


@dataclass(frozen=True)
class TripletStats:
    """What one batch looked like, measured on the hardest negative of each anchor.

    The statistics stay on the batch's device, one row per anchor, so that the step does not wait for them:
    ``sums()`` gives them as one device tensor, copied to the host once with the step's loss
    (``training.step_stats.step_summary``). Each property below copies to the host when read."""

    s_ap: Tensor  # [A] detached S_ap of every anchor, float32
    s_an: Tensor  # [A] detached S_an (hardest negative) of every anchor, float32
    valid: Tensor  # [A] bool: the anchor has a positive and a negative
    rows: Tensor  # [A, 3] batch rows of (anchor, easiest positive, hardest negative), int64

    def sums(self) -> Tensor:
        """float64 [hard triplets, Σ S_ap, Σ S_an, valid anchors] over the valid anchors, on the device."""
        s_ap, s_an, valid = self.s_ap.double(), self.s_an.double(), self.valid
        return torch.stack(
            [
                (valid & (s_an > s_ap)).sum().double(),
                torch.where(valid, s_ap, 0.0).sum(),
                torch.where(valid, s_an, 0.0).sum(),
                valid.sum().double(),
            ]
        )

    @staticmethod
    def means(hard: float, s_ap_sum: float, s_an_sum: float, valid: float) -> tuple[float, float, float]:
        """(hard_fraction, mean_s_ap, mean_s_an) from ``sums()`` read on the host; zeros with no valid anchor."""
        valid = max(valid, 1.0)
        return hard / valid, s_ap_sum / valid, s_an_sum / valid

    @property
    def hard_fraction(self) -> float:  # share of valid anchors with S_an > S_ap
        return self.means(*self.sums().tolist())[0]

    @property
    def mean_s_ap(self) -> float:
        return self.means(*self.sums().tolist())[1]

    @property
    def mean_s_an(self) -> float:
        return self.means(*self.sums().tolist())[2]

    @property
    def valid_anchors(self) -> int:
        return int(self.valid.sum())

    @property
    def pairs(self) -> Tensor:
        """[valid_anchors, 2] (S_ap, S_an) of the valid anchors, float32 on the CPU."""
        return torch.stack([self.s_ap[self.valid], self.s_an[self.valid]], dim=1).float().cpu()

    @property
    def triplets(self) -> Tensor:
        """[valid_anchors, 3] batch rows of the valid anchors' triplets, int64 on the CPU."""
        return self.rows[self.valid].cpu()


_NEG_INF = float("-inf")


def _masked_argmax(similarities: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Column index of the largest similarity where mask holds, and whether any did."""
    masked = similarities.masked_fill(~mask, _NEG_INF)
    best = masked.argmax(dim=1)
    return best, mask.any(dim=1)


@dataclass(frozen=True)
class Mining:
    """One batch's similarities and the selection every loss starts from: a row per anchor (A of them, all B
    images of the batch unless only some are this process's anchors), a column per image of the batch."""

    similarities: Tensor  # [A, B] live cosine similarities
    positives: Tensor  # [A, B] same class, not self
    negatives: Tensor  # [A, B] other class
    positive: Tensor  # [A] column of the easiest (most similar) positive
    has_positive: Tensor  # [A] bool
    labels: Tensor  # [B] class index of each column
    anchor_labels: Tensor  # [A] class index of each anchor

    @property
    def s_ap(self) -> Tensor:
        """Detached similarity of each anchor to its easiest positive."""
        return self.similarities.detach().gather(1, self.positive[:, None]).squeeze(1)


@dataclass(frozen=True)
class LossTerms:
    """A batch loss as total / count: the sum of its terms and how many terms it is the mean over."""

    total: Tensor  # live scalar
    count: Tensor  # int64 scalar, no gradient; 0 when the batch has no term (the total is then a live zero)


class MinedTripletLoss(nn.Module):
    """Base class: mines (anchor, easiest positive, hardest negative) and averages a per-anchor loss.

    Subclasses implement ``per_anchor_loss(s_ap, s_an)`` and may narrow the
    negatives with ``negative_mask``; losses over more than one negative
    override ``batch_terms`` instead. After each call, ``self.stats`` holds the
    batch's hard-triplet fraction, mean similarities and (S_ap, S_an) pairs,
    always measured on the hardest negative, whichever triplets the loss uses.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stats: TripletStats | None = None

    def per_anchor_loss(self, s_ap: Tensor, s_an: Tensor) -> Tensor:
        raise NotImplementedError

    def negative_mask(self, mining: Mining) -> Tensor:
        """Which negatives each anchor may use; all images of other classes by default."""
        return mining.negatives

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        terms = self.terms(embeddings, labels)
        return terms.total / terms.count.clamp(min=1)

    def terms(self, embeddings: Tensor, labels: Tensor, anchors: slice = slice(None)) -> LossTerms:
        """The batch loss as (sum, count), with the rows ``anchors`` of the batch as anchors and every row as a
        possible positive or negative. ``self.stats`` then describes those anchors; its triplets are batch rows."""
        unit = F.normalize(embeddings.float(), dim=1)
        similarities = unit[anchors] @ unit.T
        labels = labels.to(embeddings.device)
        columns = torch.arange(len(labels), device=embeddings.device)
        rows, anchor_labels = columns[anchors], labels[anchors]
        same = anchor_labels[:, None] == labels[None, :]
        not_self = rows[:, None] != columns[None, :]
        positive, has_positive = _masked_argmax(similarities.detach(), same & not_self)
        mining = Mining(similarities, same & not_self, ~same, positive, has_positive, labels, anchor_labels)

        hardest, has_negative = _masked_argmax(similarities.detach(), mining.negatives)
        s_an_hardest = similarities.detach().gather(1, hardest[:, None]).squeeze(1)
        self.stats = TripletStats(
            mining.s_ap.float(),
            s_an_hardest.float(),
            has_positive & has_negative,
            torch.stack([rows, positive, hardest], dim=1),
        )
        terms = self.batch_terms(mining)
        if terms is None:
            return LossTerms((embeddings * 0.0).sum(), torch.zeros((), dtype=torch.long, device=embeddings.device))
        return terms

    def batch_terms(self, mining: Mining) -> LossTerms | None:
        """Per-anchor losses summed over the anchors with a positive and an allowed negative."""
        valid, s_ap, s_an, count = _triplets(mining, self.negative_mask(mining))
        return LossTerms(_masked_sum(self.per_anchor_loss(s_ap, s_an), valid), count)


# The losses select anchors with masks, not by indexing with the valid ones: indexing needs their number on the
# host, which makes the host wait for the device at every step (so does asking whether there are any). Every
# anchor's term is computed and the invalid ones count as zero: the same sum, without the wait.


def _masked_sum(per_anchor: Tensor, valid: Tensor) -> Tensor:
    """Σ of ``per_anchor`` where ``valid``; a live zero when no anchor is (its gradient is zero)."""
    return torch.where(valid, per_anchor, 0.0).sum()


def _triplets(mining: Mining, negatives: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(valid, live S_ap, live S_an, how many valid) per anchor: valid anchors have a positive and one of
    ``negatives``; S_ap is to the easiest positive, S_an to the hardest such negative (meaningless, but finite,
    for the anchors that are not valid)."""
    negative, has_negative = _masked_argmax(mining.similarities.detach(), negatives)
    valid = mining.has_positive & has_negative
    return (
        valid,
        mining.similarities.gather(1, mining.positive[:, None]).squeeze(1),
        mining.similarities.gather(1, negative[:, None]).squeeze(1),
        valid.sum(),
    )


def _easy_positive(mining: Mining, temperature: float) -> Tensor:
    """Per anchor: −log(e^{S_ap/τ} / (e^{S_ap/τ} + Σ_n e^{S_an/τ})), its easiest positive against all negatives."""
    logits = mining.similarities / temperature
    positive_logit = logits.gather(1, mining.positive[:, None])
    negative_logits = logits.masked_fill(~mining.negatives, float("-inf"))
    return torch.logsumexp(torch.cat([positive_logit, negative_logits], dim=1), dim=1) - positive_logit.squeeze(1)


def nca(s_ap: Tensor, s_an: Tensor, temperature: float) -> Tensor:
    """-log(e^{S_ap/τ} / (e^{S_ap/τ} + e^{S_an/τ})), written stably."""
    return F.softplus((s_an - s_ap) / temperature)


class HNLoss(MinedTripletLoss):
    """NCA on the hardest negative of every anchor (collapses on hard data)."""

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature

    def per_anchor_loss(self, s_ap: Tensor, s_an: Tensor) -> Tensor:
        return nca(s_ap, s_an, self.temperature)


class SHNLoss(HNLoss):
    """NCA on the hardest negative that is not closer than the positive; anchors with none are skipped."""

    def negative_mask(self, mining: Mining) -> Tensor:
        return _semi_hard_negatives(mining)


def _semi_hard_negatives(mining: Mining) -> Tensor:
    """[A, B]: the negatives of each anchor that are not closer than its easiest positive."""
    return mining.negatives & (mining.similarities.detach() <= mining.s_ap[:, None])


WARM_LOSSES: tuple[str, ...] = get_args(WarmLoss)  # what SCT's warm start blends in (SCTLoss)


class SCTLoss(MinedTripletLoss):
    """Selectively Contrastive Triplet loss (paper eq. 13), with an optional warm start.

    A hard triplet (S_an > S_ap, or S_an > hard_threshold when given) contributes
    λ·S_an, which only pushes the negative away and leaves the positive without
    gradient; every other triplet contributes the NCA loss. With ``hard_floor``,
    a triplet is hard only if also S_an > hard_floor (the official code's 2020
    rule, with 0.5).

    Warm start: from scratch nearly every triplet starts hard, and λ·S_an alone
    never pulls a class together (docs/hard-negatives/ZERO_SHOT.md). While
    ``sct_weight`` w < 1, each anchor's loss blends in a loss that does:

    - ``warm_loss="ep"``: (1 − w)·EP + w·SCT, with EP the Easy-Positive NCA of
      the anchor's positive against all its negatives (``EasyPositiveLoss``);
    - ``warm_loss="shn"``: a hard triplet gives λ·S_an + (1 − w)·NCA(S_ap, S_an′),
      S_an′ the hardest negative not closer than the positive (SHN's; the term
      is 0 when there is none); an easy triplet gives NCA as always.

    w = 1 is the paper's SCT. The trainer raises w from 0 to 1 over the first
    ``sct_warmup`` share of the run (``warm_start_weight``).
    """

    def __init__(
        self,
        lam: float = 1.0,
        temperature: float = 0.1,
        hard_threshold: float | None = None,
        hard_floor: float | None = None,
        warm_loss: str = "ep",
    ) -> None:
        super().__init__()
        if warm_loss not in WARM_LOSSES:
            raise ValueError(f"unknown warm-start loss {warm_loss!r}; choose one of {', '.join(WARM_LOSSES)}")
        self.warm_loss = warm_loss
        self.lam = lam
        self.temperature = temperature
        self.hard_threshold = hard_threshold
        self.hard_floor = hard_floor
        self.sct_weight = 1.0  # set by the trainer at each step (warm_start_weight)

    def is_hard(self, s_ap: Tensor, s_an: Tensor) -> Tensor:
        hard = s_an > s_ap
        if self.hard_threshold is not None:
            hard = hard | (s_an > self.hard_threshold)
        if self.hard_floor is not None:
            hard = hard & (s_an > self.hard_floor)
        return hard

    def per_anchor_loss(self, s_ap: Tensor, s_an: Tensor) -> Tensor:
        hard = self.is_hard(s_ap.detach(), s_an.detach())
        return torch.where(hard, self.lam * s_an, nca(s_ap, s_an, self.temperature))

    def batch_terms(self, mining: Mining) -> LossTerms | None:
        if self.sct_weight >= 1.0:
            return super().batch_terms(mining)
        valid, s_ap, s_an, count = _triplets(mining, mining.negatives)
        sct = self.per_anchor_loss(s_ap, s_an)
        w = self.sct_weight
        if self.warm_loss == "ep":
            easy_positive = _easy_positive(mining, self.temperature)
            return LossTerms(_masked_sum((1.0 - w) * easy_positive + w * sct, valid), count)
        hard = self.is_hard(s_ap.detach(), s_an.detach())
        semi, has_semi = _masked_argmax(mining.similarities.detach(), _semi_hard_negatives(mining))
        s_an_semi = mining.similarities.gather(1, semi[:, None]).squeeze(1)
        pull = torch.where(has_semi, nca(s_ap, s_an_semi, self.temperature), 0.0)
        return LossTerms(_masked_sum(sct + torch.where(hard, (1.0 - w) * pull, 0.0), valid), count)


def warm_start_weight(progress: float, warmup: float) -> float:
    """SCT's weight w at ``progress`` (share of the run done, 0 to 1): rises linearly from 0 to 1 over the first
    ``warmup`` share of the run; 1 throughout when ``warmup`` is 0 (the paper's SCT)."""
    if warmup <= 0:
        return 1.0
    return min(max(progress / warmup, 0.0), 1.0)


class EasyPositiveLoss(MinedTripletLoss):
    """NCA of the easiest positive against every negative of the batch (Xuan et al., WACV 2020):
    −log(e^{S_ap/τ} / (e^{S_ap/τ} + Σ_n e^{S_an/τ}))."""

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature

    def batch_terms(self, mining: Mining) -> LossTerms | None:
        valid = mining.has_positive & mining.negatives.any(dim=1)
        return LossTerms(_masked_sum(_easy_positive(mining, self.temperature), valid), valid.sum())


class BatchAllTripletLoss(MinedTripletLoss):
    """Margin loss max(0, S_an − S_ap + margin) over every (anchor, positive, negative) of the batch,
    averaged over the triplets that still violate the margin (Hermans et al. 2017, "batch all").
    Memory grows as B³: fine for the paper's batches (B ≤ 512 gives 134 M triplets)."""

    def __init__(self, margin: float = 0.2) -> None:
        super().__init__()
        self.margin = margin

    def batch_terms(self, mining: Mining) -> LossTerms | None:
        sims = mining.similarities
        valid = mining.positives[:, :, None] & mining.negatives[:, None, :]  # [a, p, n]
        violation = F.relu(sims[:, None, :] - sims[:, :, None] + self.margin)
        active = valid & (violation.detach() > 0)
        return LossTerms(_masked_sum(violation, active), active.sum())


class HTLLoss(MinedTripletLoss):
    """Hierarchical Triplet Loss (Ge et al., ECCV 2018): [d_ap − d_an + α]_+ over every (a, p, n) of the batch,
    with squared distances d = ‖f_a − f_x‖² = 2 − 2·S_ax and a margin that depends on the classes' places in
    the class tree: α = max(β + d_{H(y_a, y_n)} − s_{y_a}, 0) (``training.htl.margins``).

    The batch loss is the mean over all valid triplets (a ≠ p of one class, n of another), those already
    satisfying their margin included: the paper normalises by the batch's number of triplets Z^M, not by the
    active ones, so the step shrinks as the batch gets easy instead of renormalising onto the few remaining
    violations (which batch-all does). The paper's constant factor ½ is left to the learning rate.
    Until ``set_tree`` gives it a tree (the trainer builds one before the first step) every margin is β.
    Memory grows as B³, like batch-all.
    """

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = beta
        self.tree: ClassTree | None = None
        self.set_tree(None)

    def set_tree(self, tree: ClassTree | None) -> None:
        self.tree = tree
        # the tree as tensors (node ids per level, level thresholds, within-class distances), copied to the batch's
        # device at its first use, so that the margins are computed there without a copy per step
        self._tree_tensors: tuple[Tensor, Tensor, Tensor] | None = None
        if tree is not None:
            self._tree_tensors = (
                torch.from_numpy(np.ascontiguousarray(tree.level_ids)).long(),
                torch.from_numpy(np.asarray(tree.thresholds, dtype=np.float64)),
                torch.from_numpy(np.asarray(tree.within, dtype=np.float64)),
            )

    def class_margins(self, anchor_labels: Tensor, labels: Tensor) -> Tensor:
        """α for every (anchor, negative) pair, [A, B] float32 on the labels' device; the same numbers as
        ``training.htl.margins`` (which computes them in numpy), computed on the device."""
        if self.tree is None or self._tree_tensors is None:
            return torch.full((len(anchor_labels), len(labels)), self.beta, device=labels.device)
        if self._tree_tensors[0].device != labels.device:
            self._tree_tensors = tuple(t.to(labels.device) for t in self._tree_tensors)
        level_ids, thresholds, within = self._tree_tensors
        anchor_labels = anchor_labels.to(labels.device)
        same = level_ids[:, anchor_labels, None] == level_ids[:, None, labels]  # [L+1, A, B]
        level = same.to(torch.uint8).argmax(dim=0)  # the first level where they share a node (L always does)
        alpha = self.beta + thresholds[level] - within[anchor_labels][:, None]
        return alpha.clamp_min(0.0).float()

    def batch_terms(self, mining: Mining) -> LossTerms | None:
        valid = mining.positives[:, :, None] & mining.negatives[:, None, :]  # [a, p, n]
        count = (mining.positives.sum(1) * mining.negatives.sum(1)).sum()
        distances = 2.0 - 2.0 * mining.similarities
        alpha = self.class_margins(mining.anchor_labels, mining.labels)
        violation = F.relu(distances[:, :, None] - distances[:, None, :] + alpha[:, None, :])
        return LossTerms(torch.where(valid, violation, 0.0).sum(), count)


#: Each loss's class, by name; the names are training.config.Loss, the choices of `sct train --loss`.
LOSSES: dict[str, type[MinedTripletLoss]] = {
    "sct": SCTLoss,
    "hn": HNLoss,
    "shn": SHNLoss,
    "ep": EasyPositiveLoss,
    "batch-all": BatchAllTripletLoss,
    "htl": HTLLoss,
}
if tuple(LOSSES) != get_args(Loss):
    raise ImportError(f"training.losses.LOSSES {tuple(LOSSES)} differs from training.config.Loss {get_args(Loss)}")


def build_loss(
    name: str,
    *,
    lam: float,
    temperature: float,
    hard_threshold: float | None,
    margin: float = 0.2,
    htl_beta: float = 0.1,
    hard_floor: float | None = None,
    sct_warm_loss: str = "ep",
) -> MinedTripletLoss:
    """The loss called ``name`` with the run's settings."""
    if name == "sct":
        return SCTLoss(
            lam=lam,
            temperature=temperature,
            hard_threshold=hard_threshold,
            hard_floor=hard_floor,
            warm_loss=sct_warm_loss,
        )
    if name == "batch-all":
        return BatchAllTripletLoss(margin=margin)
    if name == "htl":
        return HTLLoss(beta=htl_beta)
    if name in LOSSES:
        return LOSSES[name](temperature=temperature)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
