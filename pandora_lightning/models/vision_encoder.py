"""Vision encoder: frames -> patch tokens, from a transformers CLIP or SigLIP vision tower."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from pandora_lightning.models.loading import local_dir

_TOWERS = {"clip": (CLIPVisionConfig, CLIPVisionModel), "siglip": (SiglipVisionConfig, SiglipVisionModel)}


@dataclass
class VisionEncoderConfig:
    pretrained: str | None = None  # local transformers dir (CLIP or SigLIP); null = tiny random tower
    kind: str = "siglip"  # tower family for the tiny config: clip | siglip
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    feature_layer: int = -2  # the reference reads the penultimate layer
    image_mean: float = 0.5  # per-channel normalisation the tower was trained with
    image_std: float = 0.5

    def __post_init__(self):
        if self.kind not in _TOWERS:
            raise ValueError(f"vision.kind='{self.kind}' is unknown; use one of {sorted(_TOWERS)}")
        if self.pretrained is None and self.image_size % self.patch_size:
            raise ValueError(
                f"vision.image_size={self.image_size} is not a multiple of vision.patch_size={self.patch_size}"
            )


def _tower_from_dir(path: str) -> nn.Module:
    folder = local_dir(path, "vision encoder")
    model_type = AutoConfig.from_pretrained(folder).model_type
    family = model_type.split("_")[0]
    if family not in _TOWERS:
        raise ValueError(
            f"vision encoder: '{folder}' holds a '{model_type}' model; supported towers are "
            f"{sorted(_TOWERS)} (CLIP or SigLIP, full model or vision model)"
        )
    return _TOWERS[family][1].from_pretrained(folder)


class VisionEncoder(nn.Module):
    """Frozen image tower. (N, 3, H, W) in [-1, 1] -> (N, P, D) patch features."""

    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.pretrained:
            self.tower = _tower_from_dir(cfg.pretrained)
        else:
            config_cls, model_cls = _TOWERS[cfg.kind]
            self.tower = model_cls(
                config_cls(
                    image_size=cfg.image_size,
                    patch_size=cfg.patch_size,
                    hidden_size=cfg.hidden_size,
                    num_hidden_layers=cfg.num_layers,
                    num_attention_heads=cfg.num_heads,
                    intermediate_size=cfg.hidden_size * 4,
                )
            )
        vision_cfg = self.tower.config
        self.image_size = vision_cfg.image_size
        self.hidden_size = vision_cfg.hidden_size
        self.grid = vision_cfg.image_size // vision_cfg.patch_size
        # CLIP prepends a class token; SigLIP has none.
        self.skip_tokens = 1 if isinstance(self.tower, CLIPVisionModel) else 0

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.shape[-1] != self.image_size or frames.shape[-2] != self.image_size:
            frames = F.interpolate(frames, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        pixels = ((frames + 1) / 2 - self.cfg.image_mean) / self.cfg.image_std
        out = self.tower(pixel_values=pixels.to(self.tower.dtype), output_hidden_states=True)
        return out.hidden_states[self.cfg.feature_layer][:, self.skip_tokens :]
