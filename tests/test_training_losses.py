"""Every loss recomputed with an explicit Python loop over anchors: values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import BatchAllTripletLoss, EasyPositiveLoss, HNLoss, SCTLoss, SHNLoss, warm_start_weight

TAU = 0.1


def _nca(s_ap: torch.Tensor, s_an: torch.Tensor) -> torch.Tensor:
    return -torch.log(torch.exp(s_ap / TAU) / (torch.exp(s_ap / TAU) + torch.exp(s_an / TAU)))


def _anchors(unit: list[torch.Tensor], labels: list[int]):
    """Each anchor a that has a positive and a negative: (a, its detached similarity to every other image, its
    easiest positive, its negatives)."""
    for a in range(len(labels)):
        sims = {j: float((unit[a] @ unit[j]).detach()) for j in range(len(labels)) if j != a}
        positives = [j for j in sims if labels[j] == labels[a]]
        negatives = [j for j in sims if labels[j] != labels[a]]
        if positives and negatives:
            yield a, sims, max(positives, key=lambda j: sims[j]), negatives


def reference_loss(
    embeddings: torch.Tensor,
    labels: list[int],
    kind: str,
    lam: float = 1.0,
    threshold: float | None = None,
    floor: float | None = None,
) -> torch.Tensor:
    """The batch loss written out anchor by anchor, straight from the paper's definitions."""
    unit = [e / e.norm() for e in embeddings]
    per_anchor = []
    for a, sims, p, negatives in _anchors(unit, labels):
        if kind == "shn":
            negatives = [j for j in negatives if sims[j] <= sims[p]]
            if not negatives:
                continue
        q = max(negatives, key=lambda j: sims[j])
        s_ap, s_an = unit[a] @ unit[p], unit[a] @ unit[q]
        hard = sims[q] > sims[p] or (threshold is not None and sims[q] > threshold)
        hard = hard and (floor is None or sims[q] > floor)
        if kind == "sct" and hard:
            per_anchor.append(lam * s_an)
        else:
            per_anchor.append(_nca(s_ap, s_an))
    if not per_anchor:
        return embeddings.sum() * 0
    return torch.stack(per_anchor).mean()


def reference_easy_positive(embeddings: torch.Tensor, labels: list[int]) -> torch.Tensor:
    """−log(e^{S_ap/τ} / (e^{S_ap/τ} + Σ_n e^{S_an/τ})) with the easiest positive, anchor by anchor."""
    unit = [e / e.norm() for e in embeddings]
    per_anchor = []
    for a in range(len(labels)):
        positives = [j for j in range(len(labels)) if j != a and labels[j] == labels[a]]
        negatives = [j for j in range(len(labels)) if labels[j] != labels[a]]
        if not positives or not negatives:
            continue
        p = max(positives, key=lambda j: float((unit[a] @ unit[j]).detach()))
        numerator = torch.exp(unit[a] @ unit[p] / TAU)
        denominator = numerator + sum(torch.exp(unit[a] @ unit[n] / TAU) for n in negatives)
        per_anchor.append(-torch.log(numerator / denominator))
    return torch.stack(per_anchor).mean() if per_anchor else embeddings.sum() * 0


def reference_batch_all(embeddings: torch.Tensor, labels: list[int], margin: float = 0.2) -> torch.Tensor:
    """Mean of max(0, S_an − S_ap + m) over every violating (a, p, n) triplet."""
    unit = [e / e.norm() for e in embeddings]
    violations = []
    n = len(labels)
    for a in range(n):
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            for q in range(n):
                if labels[q] == labels[a]:
                    continue
                value = unit[a] @ unit[q] - unit[a] @ unit[p] + margin
                if float(value.detach()) > 0:
                    violations.append(value)
    return torch.stack(violations).mean() if violations else embeddings.sum() * 0


def _batch(k: int, seed: int, classes: int = 5, dim: int = 6) -> tuple[torch.Tensor, list[int]]:
    generator = torch.Generator().manual_seed(seed)
    labels = [c for c in range(classes) for _ in range(k)]
    centres = torch.randn(classes, dim, generator=generator)
    embeddings = centres[labels] + 1.2 * torch.randn(len(labels), dim, generator=generator)
    return embeddings.double(), labels


LOSSES = {
    "sct": lambda: SCTLoss(lam=1.0, temperature=TAU),
    "sct-lam0.1": lambda: SCTLoss(lam=0.1, temperature=TAU),
    "sct-threshold": lambda: SCTLoss(lam=1.0, temperature=TAU, hard_threshold=0.5),
    "sct-floor": lambda: SCTLoss(lam=1.0, temperature=TAU, hard_floor=0.6),
    "hn": lambda: HNLoss(temperature=TAU),
    "shn": lambda: SHNLoss(temperature=TAU),
    "ep": lambda: EasyPositiveLoss(temperature=TAU),
    "batch-all": lambda: BatchAllTripletLoss(margin=0.2),
}
REFERENCE = {
    "sct": dict(kind="sct"),
    "sct-lam0.1": dict(kind="sct", lam=0.1),
    "sct-threshold": dict(kind="sct", threshold=0.5),
    "sct-floor": dict(kind="sct", floor=0.6),
    "hn": dict(kind="hn"),
    "shn": dict(kind="shn"),
}
REFERENCE_FUNCTIONS = {"ep": reference_easy_positive, "batch-all": reference_batch_all}


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradient_match_explicit_loop(name: str, k: int, seed: int) -> None:
    embeddings, labels = _batch(k, seed)
    ours_input = embeddings.clone().requires_grad_(True)
    reference_input = embeddings.clone().requires_grad_(True)
    loss_fn = LOSSES[name]()
    ours = loss_fn(ours_input.float(), torch.tensor(labels))
    if name in REFERENCE_FUNCTIONS:
        expected = REFERENCE_FUNCTIONS[name](reference_input, labels)
    else:
        expected = reference_loss(reference_input, labels, **REFERENCE[name])
    ours.backward()
    expected.backward()
    assert math.isclose(ours.item(), expected.item(), rel_tol=1e-4, abs_tol=1e-5)
    assert torch.allclose(ours_input.grad.float(), reference_input.grad.float(), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize(("name", "changed"), [("sct-threshold", 4), ("sct-floor", 6)])
def test_the_threshold_and_the_floor_change_the_loss_of_the_test_batches(name: str, changed: int) -> None:
    """On how many of the 6 batches of test_loss_and_gradient_match_explicit_loop the option changes SCT's loss:
    on none, its cases there would only repeat plain SCT's."""
    batches = [_batch(k, seed) for k in (2, 4) for seed in (0, 1, 2)]
    differ = [
        LOSSES[name]()(embeddings.float(), torch.tensor(labels)).item()
        != LOSSES["sct"]()(embeddings.float(), torch.tensor(labels)).item()
        for embeddings, labels in batches
    ]
    assert sum(differ) == changed


def test_hard_triplet_gives_its_positive_no_gradient() -> None:
    # anchor 0 and positive 1 are far apart; negative 2 sits right next to the anchor: a hard triplet.
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.99, 0.14], [-1.0, 0.05]])
    labels = torch.tensor([0, 0, 1, 1])
    loss_fn = SCTLoss()
    loss_fn(embeddings, labels)
    # every anchor's hardest negative is closer than its positive (anchor 0: S_an 0.99 > S_ap 0)
    assert loss_fn.stats.hard_fraction == 1.0 and loss_fn.stats.triplets[0].tolist() == [0, 1, 2]
    # Anchor 0's triplet (0, 1, 2) is hard; positive 1 gets gradient only from triplets where it is an anchor
    # or a negative. Isolate anchor 0 with a 3-image batch.
    solo = embeddings[:3].clone().requires_grad_(True)
    SCTLoss()(solo, labels[:3]).backward()
    unit = solo.detach() / solo.detach().norm(dim=1, keepdim=True)
    assert float(unit[0] @ unit[2]) > float(unit[0] @ unit[1])
    # In the 3-image batch anchors 0 and 1 are hard (their negative 2 is closer); 2 has no positive.
    # Neither loss term involves S_ap, so no gradient can flow through S_ap at all:
    # grad of image 1 comes only from its own S_an term (anchor 1 → negative 2).
    manual = solo.detach().clone().requires_grad_(True)
    u = manual / manual.norm(dim=1, keepdim=True)
    (((u[0] @ u[2]) + (u[1] @ u[2])) / 2).backward()
    assert torch.allclose(solo.grad, manual.grad, atol=1e-6)


def test_no_valid_anchor_gives_zero_loss_that_backpropagates() -> None:
    embeddings = torch.randn(4, 8, requires_grad=True)
    for labels in (torch.tensor([0, 1, 2, 3]), torch.tensor([5, 5, 5, 5])):
        for loss_fn in (SCTLoss(), HNLoss(), SHNLoss(), EasyPositiveLoss(), BatchAllTripletLoss()):
            loss = loss_fn(embeddings, labels)
            loss.backward()
            assert loss.item() == 0.0 and not torch.isnan(loss)
            assert embeddings.grad is not None and not torch.count_nonzero(embeddings.grad)
            assert loss_fn.stats.valid_anchors == 0


def test_stats_describe_the_batch() -> None:
    embeddings, labels = _batch(2, seed=3)
    loss_fn = SCTLoss()
    loss_fn(embeddings.float(), torch.tensor(labels))
    unit = torch.nn.functional.normalize(embeddings.float(), dim=1)
    sims = unit @ unit.T
    pairs, triplets = [], []
    for a in range(len(labels)):
        p = max((j for j in range(len(labels)) if j != a and labels[j] == labels[a]), key=lambda j: sims[a, j])
        q = max((j for j in range(len(labels)) if labels[j] != labels[a]), key=lambda j: sims[a, j])
        pairs.append((float(sims[a, p]), float(sims[a, q])))
        triplets.append([a, p, q])
    stats = loss_fn.stats
    assert stats.valid_anchors == len(labels)
    assert stats.triplets.tolist() == triplets
    assert torch.allclose(stats.pairs, torch.tensor(pairs), atol=1e-6)
    assert stats.hard_fraction == pytest.approx(sum(an > ap for ap, an in pairs) / len(pairs))
    assert stats.mean_s_ap == pytest.approx(sum(ap for ap, _ in pairs) / len(pairs), abs=1e-6)
    assert stats.mean_s_an == pytest.approx(sum(an for _, an in pairs) / len(pairs), abs=1e-6)


# ------------------------------------------------------------------ SCT's warm start


def reference_warm_start(
    embeddings: torch.Tensor, labels: list[int], w: float, warm: str, lam: float = 1.0
) -> torch.Tensor:
    """SCT's warm start anchor by anchor: "ep": (1 − w)·EP + w·SCT; "shn": a hard triplet adds (1 − w)·NCA
    against its hardest negative not closer than the positive (nothing when there is none)."""
    unit = [e / e.norm() for e in embeddings]
    per_anchor = []
    for a, sims, p, negatives in _anchors(unit, labels):
        q = max(negatives, key=lambda j: sims[j])
        s_ap, s_an = unit[a] @ unit[p], unit[a] @ unit[q]
        hard = sims[q] > sims[p]
        sct = lam * s_an if hard else _nca(s_ap, s_an)
        if warm == "ep":
            denominator = torch.exp(s_ap / TAU) + sum(torch.exp(unit[a] @ unit[j] / TAU) for j in negatives)
            per_anchor.append((1 - w) * -torch.log(torch.exp(s_ap / TAU) / denominator) + w * sct)
            continue
        semi = [j for j in negatives if sims[j] <= sims[p]]
        pull = _nca(s_ap, unit[a] @ unit[max(semi, key=lambda j: sims[j])]) if semi and hard else 0.0
        per_anchor.append(sct + (1 - w) * pull)
    return torch.stack(per_anchor).mean()


@pytest.mark.parametrize("warm", ["ep", "shn"])
@pytest.mark.parametrize("w", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_warm_start_matches_an_explicit_loop(warm: str, w: float, seed: int) -> None:
    embeddings, labels = _batch(2, seed)
    ours_input = embeddings.clone().requires_grad_(True)
    reference_input = embeddings.clone().requires_grad_(True)
    loss_fn = SCTLoss(lam=0.5, warm_loss=warm)
    loss_fn.sct_weight = w
    ours = loss_fn(ours_input, torch.tensor(labels))
    expected = reference_warm_start(reference_input, labels, w, warm, lam=0.5)
    ours.backward()
    expected.backward()
    assert loss_fn.stats.hard_fraction > 0  # the batch has hard triplets, where the two losses differ
    assert math.isclose(ours.item(), expected.item(), rel_tol=1e-4, abs_tol=1e-5)
    assert torch.allclose(ours_input.grad, reference_input.grad, atol=1e-4, rtol=1e-3)


def test_the_warm_start_ends_as_the_papers_sct_and_begins_as_easy_positive() -> None:
    embeddings, labels = _batch(2, 0)
    labels = torch.tensor(labels)
    warm = SCTLoss(warm_loss="ep")
    warm.sct_weight = 0.0
    assert math.isclose(warm(embeddings, labels).item(), EasyPositiveLoss()(embeddings, labels).item(), rel_tol=1e-6)
    warm.sct_weight = 1.0
    assert warm(embeddings, labels).item() == SCTLoss()(embeddings, labels).item()


def test_during_the_warm_start_a_hard_triplet_pulls_its_positive() -> None:
    """The 3-image batch of test_hard_triplet_gives_its_positive_no_gradient: anchors 0 and 1 are hard. The
    paper's SCT gives S_ap no gradient; half-way through the warm start the positive is pulled toward the anchor."""
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.99, 0.14]])
    labels = torch.tensor([0, 0, 1])

    def d_loss_d_s_ap(w: float) -> float:
        angle = torch.tensor(0.0, requires_grad=True)  # rotate image 1 toward image 0: S_ap rises with the angle
        rotated = torch.stack([images[0], torch.stack([torch.sin(angle), torch.cos(angle)]), images[2]])
        loss_fn = SCTLoss(warm_loss="ep")
        loss_fn.sct_weight = w
        loss_fn(rotated, labels).backward()
        return float(angle.grad)

    assert d_loss_d_s_ap(1.0) > 0  # only image 1's own push on negative 2 moves it, away from the anchor
    assert d_loss_d_s_ap(0.5) < 0  # the loss falls as the positive comes closer


@pytest.mark.parametrize(
    ("progress", "warmup", "expected"),
    [(0.0, 0.5, 0.0), (0.25, 0.5, 0.5), (0.5, 0.5, 1.0), (0.9, 0.5, 1.0), (0.0, 0.0, 1.0), (0.3, 1.0, 0.3)],
)
def test_the_weight_of_sct_rises_linearly_over_the_warm_start(progress: float, warmup: float, expected: float) -> None:
    assert warm_start_weight(progress, warmup) == pytest.approx(expected)


def test_an_unknown_warm_start_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="warm-start loss 'hn'"):
        SCTLoss(warm_loss="hn")
