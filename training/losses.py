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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import Loss, WarmLoss
from training.htl import ClassTree, margins


@dataclass(frozen=True)
class TripletStats:
    """What one batch looked like, measured on the hardest negative of each anchor."""

    hard_fraction: float  # share of valid anchors with S_an > S_ap
    mean_s_ap: float
    mean_s_an: float
    valid_anchors: int
    pairs: Tensor  # [valid_anchors, 2] detached (S_ap, S_an), float32 on CPU
    triplets: Tensor  # [valid_anchors, 3] batch rows of (anchor, easiest positive, hardest negative), int64 on CPU


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
        self.stats = _stats(
            mining.s_ap, s_an_hardest, has_positive & has_negative, torch.stack([rows, positive, hardest], dim=1)
        )
        terms = self.batch_terms(mining)
        if terms is None:
            return LossTerms((embeddings * 0.0).sum(), torch.zeros((), dtype=torch.long, device=embeddings.device))
        return terms

    def batch_terms(self, mining: Mining) -> LossTerms | None:
        """Per-anchor losses over anchors with a positive and an allowed negative; None if there are none."""
        triplets = _triplets(mining, self.negative_mask(mining))
        if triplets is None:
            return None
        _, s_ap, s_an, count = triplets
        return LossTerms(self.per_anchor_loss(s_ap, s_an).sum(), count)


def _triplets(mining: Mining, negatives: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """(anchors, live S_ap, live S_an, how many) for the anchors with a positive and one of ``negatives``, each
    with its easiest positive and its hardest such negative; None if no anchor has both."""
    negative, has_negative = _masked_argmax(mining.similarities.detach(), negatives)
    valid = mining.has_positive & has_negative
    if not bool(valid.any()):
        return None
    anchors = valid.nonzero().squeeze(1)
    return (
        anchors,
        mining.similarities[anchors, mining.positive[anchors]],
        mining.similarities[anchors, negative[anchors]],
        valid.sum(),
    )


def _easy_positive(mining: Mining, anchors: Tensor, temperature: float) -> Tensor:
    """Per anchor: −log(e^{S_ap/τ} / (e^{S_ap/τ} + Σ_n e^{S_an/τ})), its easiest positive against all negatives."""
    logits = mining.similarities[anchors] / temperature
    positive_logit = logits.gather(1, mining.positive[anchors, None])
    negative_logits = logits.masked_fill(~mining.negatives[anchors], float("-inf"))
    return torch.logsumexp(torch.cat([positive_logit, negative_logits], dim=1), dim=1) - positive_logit.squeeze(1)


def _stats(s_ap: Tensor, s_an: Tensor, valid: Tensor, triplets: Tensor) -> TripletStats:
    s_ap, s_an = s_ap[valid].float().cpu(), s_an[valid].float().cpu()
    count = int(valid.sum())
    if count == 0:
        return TripletStats(0.0, 0.0, 0.0, 0, torch.zeros(0, 2), torch.zeros(0, 3, dtype=torch.long))
    return TripletStats(
        hard_fraction=float((s_an > s_ap).float().mean()),
        mean_s_ap=float(s_ap.mean()),
        mean_s_an=float(s_an.mean()),
        valid_anchors=count,
        pairs=torch.stack([s_ap, s_an], dim=1),
        triplets=triplets[valid].cpu(),
    )


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
        triplets = _triplets(mining, mining.negatives)
        if triplets is None:
            return None
        anchors, s_ap, s_an, count = triplets
        sct = self.per_anchor_loss(s_ap, s_an)
        w = self.sct_weight
        if self.warm_loss == "ep":
            easy_positive = _easy_positive(mining, anchors, self.temperature)
            return LossTerms(((1.0 - w) * easy_positive + w * sct).sum(), count)
        hard = self.is_hard(s_ap.detach(), s_an.detach())
        semi, has_semi = _masked_argmax(mining.similarities.detach(), _semi_hard_negatives(mining))
        pull = torch.where(
            has_semi[anchors], nca(s_ap, mining.similarities[anchors, semi[anchors]], self.temperature), 0.0
        )
        return LossTerms((sct + torch.where(hard, (1.0 - w) * pull, 0.0)).sum(), count)


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
        if not bool(valid.any()):
            return None
        return LossTerms(_easy_positive(mining, valid.nonzero().squeeze(1), self.temperature).sum(), valid.sum())


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
        if not bool(valid.any()):
            return None
        violation = F.relu(sims[:, None, :] - sims[:, :, None] + self.margin)[valid]
        active = violation.detach() > 0
        return LossTerms(violation[active].sum() if bool(active.any()) else violation.sum() * 0.0, active.sum())


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

    def set_tree(self, tree: ClassTree | None) -> None:
        self.tree = tree

    def class_margins(self, anchor_labels: Tensor, labels: Tensor) -> Tensor:
        """α for every (anchor, negative) pair, [A, B] float32 on the labels' device."""
        if self.tree is None:
            return torch.full((len(anchor_labels), len(labels)), self.beta, device=labels.device)
        alpha = margins(self.tree, anchor_labels.cpu().numpy()[:, None], labels.cpu().numpy()[None, :], self.beta)
        return torch.from_numpy(alpha).float().to(labels.device)

    def batch_terms(self, mining: Mining) -> LossTerms | None:
        valid = mining.positives[:, :, None] & mining.negatives[:, None, :]  # [a, p, n]
        count = (mining.positives.sum(1) * mining.negatives.sum(1)).sum()
        if int(count) == 0:
            return None
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
