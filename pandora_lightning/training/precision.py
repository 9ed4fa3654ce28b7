"""Precision: one compute dtype for the frozen parts, float32 for what trains.

Pretrained folders come in whatever dtype they were saved in (Llama/Vicuna folders in fp16, others
in bf16 or fp32). Under Lightning's `*-mixed` precisions autocast runs the matmuls in the compute
dtype, but parameters of different dtypes still meet in non-autocast ops (a concatenation, an
addition) and fail; under `32-true` an fp16 folder fails on its first matmul. So after freezing:
every frozen parameter is cast to the compute dtype and every trainable one to float32 (the
optimizer's master copy, which `16-mixed`'s gradient scaler also needs). `*-true` precisions cast
everything to their dtype (Lightning does that itself).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pandora_lightning.errors import PandoraError

# Lightning precision -> (compute dtype, autocast)
PRECISIONS: dict[str, tuple[torch.dtype, bool]] = {
    "32-true": (torch.float32, False),
    "32": (torch.float32, False),
    "bf16-mixed": (torch.bfloat16, True),
    "16-mixed": (torch.float16, True),
    "bf16-true": (torch.bfloat16, False),
    "16-true": (torch.float16, False),
}


def check_precision(precision: str) -> str:
    if str(precision) not in PRECISIONS:
        raise PandoraError(f"precision '{precision}' is unknown; use one of {', '.join(p for p in PRECISIONS if p != '32')}")
    return str(precision)


def compute_dtype(precision: str) -> torch.dtype:
    return PRECISIONS[check_precision(precision)][0]


def reconcile_dtypes(model: nn.Module, precision: str) -> None:
    """Frozen parameters -> the compute dtype; trainable ones -> float32 (or the compute dtype under `*-true`)."""
    dtype, mixed = PRECISIONS[check_precision(precision)]
    train_dtype = torch.float32 if mixed or dtype == torch.float32 else dtype
    for param in model.parameters():
        want = train_dtype if param.requires_grad else dtype
        if param.is_floating_point() and param.dtype != want:
            param.data = param.data.to(want)


def autocast(precision: str, device: torch.device | str):
    """The autocast context a `*-mixed` precision runs forward passes in (outside a Trainer: generate, score)."""
    dtype, mixed = PRECISIONS[check_precision(precision)]
    if not mixed:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def training_attention(precision: str, device: torch.device | str):
    """The attention kernels a training step runs under. On CPU in bf16, PyTorch's flash-attention
    backward is several times slower than in float32 (the tiny UNet's 8 attention calls: 27 ms against
    7 ms a step at 2 threads), so bf16 steps there run the math kernel, whose bf16 matmuls do pay; the
    backward follows the kernel the forward chose. Elsewhere attention keeps PyTorch's own choice."""
    if compute_dtype(precision) == torch.bfloat16 and torch.device(device).type == "cpu":
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def resolve_device(name: str | None) -> torch.device:
    """`--device`: cpu, cuda, cuda:N, mps; None or "auto" = the first GPU when there is one."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PandoraError(f"device '{name}' is not a device torch knows; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PandoraError(f"device '{name}': this torch build sees no CUDA GPU (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise PandoraError(f"device '{name}': there are only {torch.cuda.device_count()} CUDA GPUs")
    return device
