"""Triplet losses mined from a P×K batch (Xuan et al., ECCV 2020, and baselines).

Every loss shares one selection of triplets from the batch cosine-similarity
matrix: the anchor itself is excluded, the positive is the most similar other
image of the anchor's class, the negative is the most similar image of another
class. Selection runs on detached similarities; the loss uses the live ones.
The batch loss is the mean over anchors that have both a positive and a
negative.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class TripletStats:
    """What one batch looked like, measured on the hardest negative of each anchor."""

    hard_fraction: float  # share of valid anchors with S_an > S_ap
    mean_s_ap: float
    mean_s_an: float
    valid_anchors: int
    pairs: Tensor  # [valid_anchors, 2] detached (S_ap, S_an), float32 on CPU


_NEG_INF = float("-inf")


def _masked_argmax(similarities: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Column index of the largest similarity where mask holds, and whether any did."""
    masked = similarities.masked_fill(~mask, _NEG_INF)
    best = masked.argmax(dim=1)
    return best, mask.any(dim=1)


class MinedTripletLoss(nn.Module):
    """Base class: mines (anchor, easiest positive, hardest negative) and averages a per-anchor loss.

    Subclasses implement ``per_anchor_loss(s_ap, s_an)``; they may narrow the
    negatives with ``negative_mask``. After each call, ``self.stats`` holds the
    batch's hard-triplet fraction, mean similarities and (S_ap, S_an) pairs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stats: TripletStats | None = None

    def per_anchor_loss(self, s_ap: Tensor, s_an: Tensor) -> Tensor:
        raise NotImplementedError

    def negative_mask(self, detached: Tensor, different: Tensor, s_ap: Tensor) -> Tensor:
        """Which negatives an anchor may use; all images of other classes by default."""
        return different

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        unit = F.normalize(embeddings.float(), dim=1)
        similarities = unit @ unit.T
        detached = similarities.detach()
        labels = labels.to(embeddings.device)
        same = labels[:, None] == labels[None, :]
        not_self = ~torch.eye(len(labels), dtype=torch.bool, device=embeddings.device)
        different = ~same

        positive, has_positive = _masked_argmax(detached, same & not_self)
        rows = torch.arange(len(labels), device=embeddings.device)
        s_ap_detached = detached[rows, positive]

        hardest, has_negative = _masked_argmax(detached, different)
        self.stats = _stats(s_ap_detached, detached[rows, hardest], has_positive & has_negative)

        allowed = self.negative_mask(detached, different, s_ap_detached)
        negative, has_allowed = _masked_argmax(detached, allowed)
        valid = has_positive & has_allowed
        if not bool(valid.any()):
            return (embeddings * 0.0).sum()
        anchors = rows[valid]
        s_ap = similarities[anchors, positive[valid]]
        s_an = similarities[anchors, negative[valid]]
        return self.per_anchor_loss(s_ap, s_an).mean()


def _stats(s_ap: Tensor, s_an: Tensor, valid: Tensor) -> TripletStats:
    s_ap, s_an = s_ap[valid].float().cpu(), s_an[valid].float().cpu()
    count = int(valid.sum())
    if count == 0:
        return TripletStats(0.0, 0.0, 0.0, 0, torch.zeros(0, 2))
    return TripletStats(
        hard_fraction=float((s_an > s_ap).float().mean()),
        mean_s_ap=float(s_ap.mean()),
        mean_s_an=float(s_an.mean()),
        valid_anchors=count,
        pairs=torch.stack([s_ap, s_an], dim=1),
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

    def negative_mask(self, detached: Tensor, different: Tensor, s_ap: Tensor) -> Tensor:
        return different & (detached <= s_ap[:, None])


class SCTLoss(MinedTripletLoss):
    """Selectively Contrastive Triplet loss (paper eq. 13).

    A hard triplet (S_an > S_ap, or S_an > hard_threshold when given) contributes
    λ·S_an, which only pushes the negative away and leaves the positive without
    gradient; every other triplet contributes the NCA loss.
    """

    def __init__(self, lam: float = 1.0, temperature: float = 0.1, hard_threshold: float | None = None) -> None:
        super().__init__()
        self.lam = lam
        self.temperature = temperature
        self.hard_threshold = hard_threshold

    def per_anchor_loss(self, s_ap: Tensor, s_an: Tensor) -> Tensor:
        hard = s_an.detach() > s_ap.detach()
        if self.hard_threshold is not None:
            hard = hard | (s_an.detach() > self.hard_threshold)
        return torch.where(hard, self.lam * s_an, nca(s_ap, s_an, self.temperature))


LOSSES = {"sct": SCTLoss, "hn": HNLoss, "shn": SHNLoss}


def build_loss(name: str, *, lam: float, temperature: float, hard_threshold: float | None) -> MinedTripletLoss:
    """The loss called ``name`` with the run's settings."""
    if name == "sct":
        return SCTLoss(lam=lam, temperature=temperature, hard_threshold=hard_threshold)
    if name in LOSSES:
        return LOSSES[name](temperature=temperature)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
