"""Input adapter: vision patch features -> a fixed number of LLM embeddings per frame."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class InputAdapterConfig:
    tokens_per_frame: int = 4  # 112 in the reference; must be a square (pooled on the patch grid)

    def __post_init__(self):
        side = math.isqrt(self.tokens_per_frame)
        if self.tokens_per_frame < 1 or side * side != self.tokens_per_frame:
            raise ValueError(
                f"input_adapter.tokens_per_frame={self.tokens_per_frame} must be a square number "
                f"(1, 4, 9, 16, ...): tokens are pooled on a square patch grid"
            )


class InputAdapter(nn.Module):
    """(B, T, P, Dv) patch features on a square grid -> (B, T * K, Dllm) embeddings."""

    def __init__(self, cfg: InputAdapterConfig, in_dim: int, out_dim: int):
        super().__init__()
        self.side = math.isqrt(cfg.tokens_per_frame)
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        # Zero-initialised output (as in ControlNet / LLaMA-Adapter): the LLM starts by reading the
        # text alone, and the video state's share grows only as far as it helps the loss.
        nn.init.zeros_(self.proj[-1].weight)
        nn.init.zeros_(self.proj[-1].bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, t, p, d = patches.shape
        grid = math.isqrt(p)
        if grid * grid != p or grid < self.side:
            raise ValueError(f"input adapter: {p} patches per frame do not form a square grid of at least {self.side}x{self.side}")
        maps = patches.reshape(b * t, grid, grid, d).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(maps, self.side).flatten(2).transpose(1, 2)  # (B*T, K, Dv)
        return self.proj(self.norm(pooled)).reshape(b, t * self.side * self.side, -1)
