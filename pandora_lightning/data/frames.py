"""The two pixel ranges of the project and the only place that converts between them.

Stored and decoded frames are uint8 in [0, 255]; the model reads and writes floats in [-1, 1].
Tensors are channels-first (..., 3, H, W); numpy frames, as decoded and written, channels-last
(..., H, W, 3).
"""
from __future__ import annotations

import numpy as np
import torch


def to_model_range(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (..., 3, H, W) in [0, 255] -> `dtype` in [-1, 1]."""
    return frames.to(dtype) / 127.5 - 1


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """float (..., 3, H, W) in [-1, 1] (clamped) -> uint8 (..., 3, H, W), same device."""
    return ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_numpy(frames: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1]."""
    return to_model_range(torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3))


def to_numpy(video: torch.Tensor) -> np.ndarray:
    """float (..., 3, H, W) in [-1, 1] -> uint8 (..., H, W, 3) numpy on the CPU."""
    return to_uint8(video).movedim(-3, -1).cpu().numpy()
