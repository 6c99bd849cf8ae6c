"""Training with several processes: torch.distributed process groups as torchrun starts them.

``torchrun --nproc-per-node N -m sct train ...`` sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each process; ``init`` joins the
process group they describe (NCCL on CUDA, gloo on CPU). Without those
variables no group is started and every helper here answers as for a single
process: rank 0 of 1, ``barrier`` does nothing, a gather returns its input.

The trainer wraps the model in DistributedDataParallel, which averages the
parameter gradients over the processes. ``global_batch_loss`` mines from the
gathered global batch and scales each process's share of the loss so that this
average is exactly the gradient one process would compute on the whole batch.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, get_args

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from training.config import DistBackend
from training.losses import MinedTripletLoss

BACKENDS: tuple[str, ...] = get_args(DistBackend)
# Rank 0 alone evaluates and builds the HTL class tree while the others wait at a barrier; torch's default
# timeout (10 minutes for NCCL) is too short for embedding a large test set or training split.
TIMEOUT = timedelta(hours=2)


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher with its environment variables) started this process."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK), 0 without torchrun; picks its GPU."""
    return int(os.environ.get("LOCAL_RANK", 0))


def gpu_index(share_gpus: bool = False) -> int:
    """The GPU this process trains on: its local rank, or with ``share_gpus`` the local rank modulo the GPUs
    torch sees, so that more processes than GPUs share them (two processes on a one-GPU machine both use cuda:0)."""
    gpus = torch.cuda.device_count()
    return local_rank() % gpus if share_gpus and gpus else local_rank()


def shares_a_gpu(device: torch.device, share_gpus: bool) -> bool:
    """Whether ``share_gpus`` puts several of this node's processes (torchrun's LOCAL_WORLD_SIZE) on one GPU."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return share_gpus and device.type == "cuda" and local_processes > torch.cuda.device_count()


def choose_backend(requested: str, device: torch.device, *, shared_gpu: bool = False) -> str:
    """NCCL for CUDA devices and gloo for the CPU when ``requested`` is "auto"; an explicit choice is checked.
    Processes that share a GPU (``shared_gpu``) use gloo: NCCL refuses two processes on one device."""
    if requested not in BACKENDS:
        raise ValueError(f"dist_backend must be one of {', '.join(BACKENDS)}, not {requested!r}")
    if requested == "auto":
        return "nccl" if device.type == "cuda" and not shared_gpu else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise ValueError("--dist-backend nccl needs CUDA devices; this run trains on the CPU (use gloo or auto)")
    if requested == "nccl" and shared_gpu:
        raise ValueError(
            "--dist-backend nccl cannot run two processes on one GPU (--share-gpus with more processes per node "
            "than GPUs); use gloo or auto"
        )
    return requested


def init(backend: str, device: torch.device, *, shared_gpu: bool = False) -> str:
    """Join the process group that torchrun's environment describes, with ``device`` as this process's device;
    returns the backend's name."""
    name = choose_backend(backend, device, shared_gpu=shared_gpu)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        name, init_method="env://", timeout=TIMEOUT, device_id=device if device.type == "cuda" else None
    )
    return name


def cleanup() -> None:
    if is_active():
        dist.destroy_process_group()


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """Rank 0: the process that writes the run folder, evaluates and shows progress (torchrun's RANK when the
    process group is not, or no longer, active)."""
    return rank() == 0 if is_active() else int(os.environ.get("RANK", 0)) == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when several processes train, else ``model`` itself."""
    if world_size() == 1:
        return model
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        # synchronised BatchNorm keeps the buffers (running statistics) equal: broadcasting them each step is waste
        broadcast_buffers=not any(isinstance(m, (nn.SyncBatchNorm, GlooSyncBatchNorm)) for m in model.modules()),
    )


def all_reduce_sum(values: Tensor) -> Tensor:
    """The elementwise sum of ``values`` over the processes (a new tensor; no gradient)."""
    total = values.detach().clone()
    if world_size() > 1:
        dist.all_reduce(total)
    return total


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every process."""
    if world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def broadcast_buffers(module: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics): DDP syncs them before each forward,
    but each process then updates them with its own share of the batch."""
    if world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def gather_sizes(rows: int, device: torch.device) -> list[int]:
    """Every process's number of rows, in rank order."""
    if world_size() == 1:
        return [rows]
    size = torch.tensor([rows], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def all_gather_rows(tensor: Tensor) -> tuple[Tensor, slice]:
    """The processes' tensors stacked along dim 0 in rank order (their numbers of rows may differ), and the rows
    that are this process's. No gradient flows back; see ``all_gather_with_grad``."""
    sizes = gather_sizes(len(tensor), tensor.device)
    return _gather(tensor.detach(), sizes), _own_rows(sizes)


def all_gather_with_grad(tensor: Tensor) -> tuple[Tensor, slice]:
    """Like ``all_gather_rows``, but differentiable: the gradient that reaches this process's rows is the sum,
    over all processes, of the gradients their losses send to those rows."""
    if world_size() == 1:
        return tensor, slice(0, len(tensor))
    sizes = gather_sizes(len(tensor), tensor.device)
    return _GatherRows.apply(tensor, sizes), _own_rows(sizes)


def _own_rows(sizes: list[int]) -> slice:
    start = sum(sizes[: rank()])
    return slice(start, start + sizes[rank()])


def _gather(tensor: Tensor, sizes: list[int]) -> Tensor:
    if len(sizes) == 1:
        return tensor
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward pass all-reduces (sums) the gradient of the gathered tensor and keeps
    this process's rows: a reduce-scatter that also works for unequal row counts and on gloo."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, sizes: list[int]) -> Tensor:
        ctx.rows = _own_rows(sizes)
        return _gather(tensor, sizes)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        if world_size() > 1:
            dist.all_reduce(grad)
        return grad[ctx.rows], None


def global_batch_loss(loss_fn: MinedTripletLoss, embeddings: Tensor, labels: Tensor) -> Tensor:
    """This process's share of the loss of the global batch, mined across all processes (--gather-embeddings).

    The embeddings and labels are all-gathered; this process's rows are its anchors and every row of the global
    batch is a candidate positive or negative, so the hardest negative of an anchor may live on another process.
    With W processes, N the number of terms the global loss averages over (valid anchors, or triplets for
    batch-all and HTL; summed over the processes) and ℓ_a the terms of this process's anchors, the value is

        L_r = W · Σ_{a on r} ℓ_a / N,   so that   Σ_r L_r = W · L,   L = Σ_a ℓ_a / N the global loss.

    Gradient: every L_s depends on every embedding e_i through the gathered batch. The gather's backward pass sums
    over the processes, so row e_i on its own process r receives Σ_s ∂L_s/∂e_i = W · ∂L/∂e_i, and the parameter
    gradient on r is W · Σ_{i on r} (∂L/∂e_i)(∂e_i/∂θ). DistributedDataParallel averages it over the W processes:
    (1/W) · Σ_r W · Σ_{i on r} (∂L/∂e_i)(∂e_i/∂θ) = Σ_i (∂L/∂e_i)(∂e_i/∂θ) = ∂L/∂θ, the single-process gradient of
    the global batch. (With per-process BatchNorm, e_i depends on its own process's batch statistics; with
    --sync-bn on the global batch's, whose all-reduce also sums gradients in its backward pass, and the same
    argument holds.) Selection and N carry no gradient. Each process computes only its anchors' rows of the
    similarity matrix, [B/W, B] instead of [B, B] (B/W × B × B triplets for batch-all and HTL).

    The logged loss is the sum of the L_r over the processes divided by W, which is L.
    """
    gathered, own = all_gather_with_grad(embeddings)
    all_labels, _ = all_gather_rows(labels)
    terms = loss_fn.terms(gathered, all_labels, anchors=own)
    count = all_reduce_sum(terms.count)
    return world_size() * terms.total / count.clamp(min=1)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``model`` normalised with the global batch's statistics: torch's SyncBatchNorm on CUDA,
    ``GlooSyncBatchNorm`` on the CPU (torch's accepts only GPU tensors)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _replace_batchnorm(model)


def _replace_batchnorm(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        replacement = GlooSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        replacement.load_state_dict(module.state_dict())
        replacement.train(module.training)
        return replacement
    for name, child in module.named_children():
        module.add_module(name, _replace_batchnorm(child))
    return module


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over the global batch, in plain torch ops, for CPU processes (gloo).

    In training mode with several processes, the mean and then the centred sum of squares are all-reduced with
    torch.distributed.nn's differentiable all_reduce, whose backward pass sums the gradients, so gradients flow
    across processes as through a BatchNorm over the whole batch. Running statistics are updated as torch does
    (unbiased variance, ``momentum``, or a cumulative average when it is None). Otherwise it is a BatchNorm.
    Its state dict is a BatchNorm's.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least a 2-D input (got {input.dim()}-D)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        values = input.float()
        count = all_reduce_sum(torch.tensor(float(values.numel() // values.shape[1]), dtype=torch.float64))
        mean = dist_nn.all_reduce(values.sum(dims)) / float(count)
        centred = values - mean.view(shape)
        variance = dist_nn.all_reduce((centred * centred).sum(dims)) / float(count)
        output = centred * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_statistics(mean.detach(), variance.detach() * float(count) / max(float(count) - 1, 1))
        return output.to(input.dtype)

    @torch.no_grad()
    def _update_running_statistics(self, mean: Tensor, unbiased_variance: Tensor) -> None:
        self.num_batches_tracked += 1
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(unbiased_variance, momentum)
