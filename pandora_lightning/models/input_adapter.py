"""Input adapter: a frame's grid of vision patch features -> a fixed number of LLM embeddings."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from pandora_lightning.errors import PandoraError


@dataclass
class InputAdapterConfig:
    # 112 in the reference. Patch features are average-pooled to an h x w grid with h * w = this,
    # the factor pair closest to the patch grid's aspect (112 on CLIP's 16x16: 8x14).
    tokens_per_frame: int = 4

    def __post_init__(self):
        if self.tokens_per_frame < 1:
            raise PandoraError(f"input_adapter.tokens_per_frame={self.tokens_per_frame} must be >= 1")


@lru_cache(maxsize=64)
def pooled_grid(tokens: int, grid: tuple[int, int]) -> tuple[int, int]:
    """(h, w) with h * w = tokens, h <= gh, w <= gw, whose aspect is closest to the grid's (ties: wider)."""
    gh, gw = grid
    pairs = [(h, tokens // h) for h in range(1, tokens + 1) if tokens % h == 0 and h <= gh and tokens // h <= gw]
    if not pairs:
        raise PandoraError(
            f"input_adapter.tokens_per_frame={tokens} cannot be pooled from a {gh}x{gw} patch grid: it needs "
            f"h x w = {tokens} with h <= {gh} and w <= {gw}"
        )
    aspect = math.log(gh / gw)
    return min(pairs, key=lambda p: (round(abs(math.log(p[0] / p[1]) - aspect), 9), p[0]))


class InputAdapter(nn.Module):
    """(B, T, gh, gw, Dv) patch features -> (B, T * K, Dllm) embeddings, K = tokens_per_frame."""

    def __init__(self, cfg: InputAdapterConfig, in_dim: int, out_dim: int):
        super().__init__()
        self.tokens = cfg.tokens_per_frame
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        # Zero-initialised output (as in ControlNet / LLaMA-Adapter): the LLM starts by reading the
        # text alone, and the video state's share grows only as far as it helps the loss.
        nn.init.zeros_(self.proj[-1].weight)
        nn.init.zeros_(self.proj[-1].bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, t, gh, gw, d = patches.shape
        maps = patches.reshape(b * t, gh, gw, d).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(maps, pooled_grid(self.tokens, (gh, gw))).flatten(2).transpose(1, 2)  # (B*T, K, Dv)
        return self.proj(self.norm(pooled)).reshape(b, t * self.tokens, -1)
