"""Mixed precision: bf16 autocast where the hardware does bf16 natively, fp32 elsewhere."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from core.errors import UserValueError


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 on CUDA and on CPUs with AVX512-BF16 or AMX when ``precision`` is "auto"; None means fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16" or device.type == "cuda":
        return torch.bfloat16
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    native = native or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if native else None


def training_autocast_dtype(
    model: nn.Module, device: torch.device, precision: str, image_size: int
) -> tuple[torch.dtype | None, str | None]:
    """``autocast_dtype`` for training steps, and a note to print when "auto" fell back to fp32.

    On the CPU, bf16 autocast computes wrong weight gradients for a strided convolution whose input is 1×1
    (oneDNN in PyTorch 2.14: off by factors of 3 up to 1e37, and not the same from run to run), which happens
    when the images are too small for the trunk (a whole ResNet at 16 px). Its forward pass and input gradients
    are right, so embedding stays in bf16. "auto" trains such a model in fp32 and says so; "bf16" is refused.
    """
    dtype = autocast_dtype(device, precision)
    if dtype is None or device.type != "cpu":
        return dtype, None
    faulty = single_pixel_strided_convs(model, image_size)
    if not faulty:
        return dtype, None
    where = f"{faulty[0]}" + (f" and {len(faulty) - 1} more" if len(faulty) > 1 else "")
    problem = (
        f"at image size {image_size} the strided convolution {where} gets a 1×1 input, "
        "whose weight gradients the CPU's bf16 kernels compute wrongly"
    )
    if precision == "bf16":
        raise UserValueError(f"--precision bf16 on the CPU: {problem}; use --precision fp32 or a larger --image-size")
    return None, f"precision: fp32, not bf16: {problem}"


def single_pixel_strided_convs(model: nn.Module, image_size: int) -> list[str]:
    """Names of ``model``'s convolutions with a stride above 1 whose input is 1×1 when it embeds one
    ``image_size`` × ``image_size`` image, in the order the forward pass reaches them."""
    found: list[str] = []

    def hook(name: str):
        return lambda module, args: found.append(name) if tuple(args[0].shape[-2:]) == (1, 1) else None

    hooks = [
        module.register_forward_pre_hook(hook(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and max(module.stride) > 1
    ]
    training = model.training
    parameter = next(model.parameters())
    try:
        model.eval()  # BatchNorm's running statistics stay as they are
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=parameter.device, dtype=parameter.dtype))
    finally:
        for handle in hooks:
            handle.remove()
        model.train(training)
    return found


def apply_fp32_policy(precision: str) -> None:
    """``precision`` "fp32" means IEEE fp32 on CUDA too: TF32 off for matmuls and for cuDNN's convolutions, whose
    torch default is TF32 (a 10-bit mantissa). These are process-wide torch settings. "auto" and "bf16" leave
    them as torch has them, where TF32 convolutions are allowed: those runs compute in bf16 under autocast, and
    the few fp32 convolutions outside it may as well use the faster TF32."""
    if precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


#: cuBLAS's workspace setting for deterministic results (CUDA's documentation: ":4096:8" or ":16:8").
CUBLAS_WORKSPACE = ":4096:8"


def make_deterministic() -> None:
    """Process-wide torch settings for arithmetic that repeats run to run, for comparing runs to 1e-4 (DDP
    against one GPU): fp32 without TF32, cuDNN's deterministic algorithms chosen without benchmarking, cuBLAS with
    a fixed workspace (CUBLAS_WORKSPACE_CONFIG, read when cuBLAS starts: set here before the first matmul unless
    already set), and torch.use_deterministic_algorithms, under which an operation that has no deterministic
    version raises naming itself."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    apply_fp32_policy("fp32")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for ``dtype``, or a no-op for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
