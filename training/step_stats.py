"""What a training step logs of its batch, over every process: the loss and triplet statistics of each step
(a metrics.jsonl line), and now and then a triplet snapshot (the triplets mined, with their similarities before
the step and re-measured after it).

With several processes each holds the statistics of its own anchors; both are reported for the global batch, so
that a run under torchrun logs what one process would on the same global batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from training import distributed
from training.losses import TripletStats
from training.precision import autocast


def step_summary(loss: torch.Tensor, stats: TripletStats, device: torch.device) -> dict[str, float]:
    """Loss and triplet statistics of the global batch: this process's own with one process; with several,
    the mean of the processes' losses (the global loss with --gather-embeddings, whose shares are scaled by
    the world size) and the statistics over every process's anchors.

    The loss and the statistics come to the host in one copy: the step's only wait for the device."""
    world = distributed.world_size()
    sums = torch.cat([loss.detach().double().reshape(1).to(device), stats.sums().to(device)])
    if world > 1:
        sums = distributed.all_reduce_sum(sums)
    loss_sum, hard, s_ap_sum, s_an_sum, valid = sums.tolist()
    hard_fraction, mean_s_ap, mean_s_an = TripletStats.means(hard, s_ap_sum, s_an_sum, valid)
    return {"loss": loss_sum / world, "hard_fraction": hard_fraction, "mean_s_ap": mean_s_ap, "mean_s_an": mean_s_an}


def triplet_snapshot(
    model: torch.nn.Module,
    images: torch.Tensor,
    stats: TripletStats,
    *,
    gathered: bool,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> dict[str, np.ndarray] | None:
    """The batch's (S_ap, S_an) pairs before this step, and the same triplets' similarities re-measured by
    ``model`` (the weights after the step) in training mode, leaving its BatchNorm statistics as they were.
    With several processes: the global batch's, its rows in rank order, on rank 0 (None on the others, which
    must still call it: it gathers). ``gathered``: the triplets already index the global batch
    (--gather-embeddings)."""
    with torch.no_grad(), frozen_batchnorm_statistics(model), autocast(device, amp_dtype):
        after = model(images)
    unit, own_rows = distributed.all_gather_rows(torch.nn.functional.normalize(after.float(), dim=1))
    pairs, triplets = stats.pairs, stats.triplets
    if distributed.world_size() > 1:
        if not gathered:  # rows of this process's share → rows of the global batch
            triplets = triplets + own_rows.start
        pairs = distributed.all_gather_rows(pairs.to(device))[0]
        triplets = distributed.all_gather_rows(triplets.to(device))[0]
    if distributed.rank() != 0:
        return None
    unit, pairs, triplets = unit.cpu(), pairs.cpu().numpy(), triplets.cpu()
    anchor, positive, negative = triplets.unbind(dim=1)
    return {
        "s_ap": pairs[:, 0],
        "s_an": pairs[:, 1],
        "triplets": triplets.numpy(),
        "s_ap_after": (unit[anchor] * unit[positive]).sum(1).numpy(),
        "s_an_after": (unit[anchor] * unit[negative]).sum(1).numpy(),
    }


@contextlib.contextmanager
def frozen_batchnorm_statistics(model: torch.nn.Module) -> Iterator[None]:
    """Inside, a train-mode forward pass normalises with batch statistics as training does,
    but leaves every BatchNorm's running averages (and batch counter) as they were."""
    saved = []
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            counter = module.num_batches_tracked.clone() if module.num_batches_tracked is not None else None
            saved.append((module, module.momentum, counter))
            module.momentum = 0.0  # running = (1 − 0)·running + 0·batch
    try:
        yield
    finally:
        for module, momentum, counter in saved:
            module.momentum = momentum
            if counter is not None:
                module.num_batches_tracked.copy_(counter)
