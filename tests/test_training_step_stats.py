"""A step's logged statistics and its triplet snapshot (training/step_stats.py), in one process; under torchrun
they are checked against one process in tests/test_training_distributed.py."""

from __future__ import annotations

import copy

import pytest
import torch

from training.losses import build_loss
from training.model import build_model
from training.step_stats import step_summary, triplet_snapshot

CPU = torch.device("cpu")


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return images.contiguous(memory_format=torch.channels_last), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", 8, "none", embedding_bn=True).to(memory_format=torch.channels_last).train()


def test_one_process_logs_its_own_loss_and_statistics() -> None:
    images, labels = _batch()
    loss_fn = build_loss("sct", lam=1.0, temperature=0.1, hard_threshold=None, margin=0.2)
    loss = loss_fn(_model()(images), labels)
    stats = loss_fn.stats
    summary = step_summary(loss, stats, CPU)
    assert list(summary) == ["loss", "hard_fraction", "mean_s_ap", "mean_s_an"]
    assert summary == {
        "loss": pytest.approx(float(loss.detach())),
        "hard_fraction": stats.hard_fraction,
        "mean_s_ap": stats.mean_s_ap,
        "mean_s_an": stats.mean_s_an,
    }
    s_ap, s_an = stats.pairs.unbind(dim=1)
    assert summary["hard_fraction"] == pytest.approx(float((s_an > s_ap).float().mean()))


def test_the_snapshot_remeasures_the_triplets_with_the_model_given_and_leaves_batchnorm_alone() -> None:
    """The pairs before the step, and the same triplets' similarities by the model's current weights in
    training mode (batch statistics); the measuring pass changes no running statistic or batch counter."""
    images, labels = _batch()
    model = _model()
    loss_fn = build_loss("hn", lam=1.0, temperature=0.1, hard_threshold=None, margin=0.2)
    loss = loss_fn(model(images), labels)
    loss.backward()
    with torch.no_grad():
        for parameter in model.parameters():  # a step
            parameter -= 0.5 * parameter.grad
    stats = loss_fn.stats
    before = copy.deepcopy(model.state_dict())
    snapshot = triplet_snapshot(model, images, stats, gathered=False, device=CPU, amp_dtype=None)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by the measuring pass"
    assert list(snapshot) == ["s_ap", "s_an", "triplets", "s_ap_after", "s_an_after"]
    assert snapshot["triplets"].tolist() == stats.triplets.tolist()
    assert snapshot["s_ap"].tolist() == stats.pairs[:, 0].tolist()
    assert snapshot["s_an"].tolist() == stats.pairs[:, 1].tolist()
    twin = copy.deepcopy(model).train()
    with torch.no_grad():
        unit = torch.nn.functional.normalize(twin(images), dim=1)
    for row, (a, p, n) in enumerate(snapshot["triplets"]):
        assert snapshot["s_ap_after"][row] == pytest.approx(float(unit[a] @ unit[p]), abs=1e-5)
        assert snapshot["s_an_after"][row] == pytest.approx(float(unit[a] @ unit[n]), abs=1e-5)
    assert not torch.allclose(
        torch.from_numpy(snapshot["s_an_after"]), torch.from_numpy(snapshot["s_an"]), atol=1e-3
    ), "the step moves the similarities"
