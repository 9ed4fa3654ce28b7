"""Vision encoder: frames -> a grid of patch features, from a transformers CLIP or SigLIP vision tower.

Frames are prepared as the tower's own image processor prepares images (its folder's
preprocessor_config.json: resize, centre crop, per-channel mean and std), but on tensors, batched,
on the model's device. `crop: false` keeps the whole frame at its aspect instead (shortest edge to
the tower's size, position embeddings interpolated), so a 320x512 frame gives a 16x25 grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from pandora_lightning.errors import PandoraError
from pandora_lightning.models.loading import LoadOptions, build_empty, check_weights, local_dir, read_config

_TOWERS = {"clip": (CLIPVisionConfig, CLIPVisionModel), "siglip": (SiglipVisionConfig, SiglipVisionModel)}
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's codes, as preprocessor_config.json stores them
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


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
    # Per-channel normalisation of the tiny tower; a pretrained one uses its folder's image processor.
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    # true: non-square frames are centre-cropped to the tower's square (CLIP's processor does this);
    # false: the whole frame at its aspect; null: as the folder's processor does (tiny: squash to the square).
    crop: bool | None = None

    def __post_init__(self):
        if self.kind not in _TOWERS:
            raise PandoraError(f"vision.kind='{self.kind}' is unknown; use one of {sorted(_TOWERS)}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise PandoraError("vision.image_mean and vision.image_std need 3 values (RGB), the std ones > 0")
        if self.pretrained is None and self.image_size % self.patch_size:
            raise PandoraError(f"vision.image_size={self.image_size} is not a multiple of vision.patch_size={self.patch_size}")


@dataclass
class ImageProcessing:
    """An image processor's steps as numbers: resize (shortest edge, or both edges), centre crop, normalise."""

    size: int  # the tower's input side
    shortest_edge: bool  # resize the shorter side to `size` keeping the aspect (else both sides: a squash)
    crop: bool  # then cut the centre `size` x `size` square
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resample: str = "bicubic"

    @classmethod
    def from_folder(cls, folder: Path, size: int, family: str) -> ImageProcessing:
        """The folder's preprocessor_config.json; without one, the family's published statistics."""
        if not (folder / "preprocessor_config.json").is_file():
            clip = family == "clip"
            return cls(size, clip, clip, CLIP_MEAN if clip else (0.5,) * 3, CLIP_STD if clip else (0.5,) * 3)
        cfg = read_config(folder, "preprocessor_config.json")
        resize = cfg.get("size") or {}
        normalize = cfg.get("do_normalize", True)
        # an int size means the shortest edge for CLIP's processor, both edges for SigLIP's
        shortest = "shortest_edge" in resize if isinstance(resize, dict) else family == "clip"
        return cls(
            size=size,
            shortest_edge=shortest and cfg.get("do_resize", True),
            crop=bool(cfg.get("do_center_crop", False)),
            mean=tuple(cfg.get("image_mean", (0.0,) * 3)) if normalize else (0.0,) * 3,
            std=tuple(cfg.get("image_std", (1.0,) * 3)) if normalize else (1.0,) * 3,
            resample=_RESAMPLE.get(cfg.get("resample", 3), "bicubic"),
        )

    def resized(self, height: int, width: int, keep_aspect: bool) -> tuple[int, int]:
        """(H, W) after resizing, before any crop."""
        if not (keep_aspect or self.shortest_edge):
            return self.size, self.size
        scale = self.size / min(height, width)
        # transformers' get_resize_output_image_size truncates the long side the same way
        return (self.size, int(width * scale)) if height <= width else (int(height * scale), self.size)

    def __call__(self, frames: torch.Tensor, keep_aspect: bool = False) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, 3, h, w) normalised pixels, in float32."""
        x = (frames.float() + 1) / 2
        out = self.resized(*x.shape[-2:], keep_aspect)
        if tuple(x.shape[-2:]) != out:
            smooth = self.resample != "nearest"
            x = F.interpolate(x, size=out, mode=self.resample, antialias=smooth, align_corners=False if smooth else None)
        if self.crop and not keep_aspect:
            top, left = (out[0] - self.size) // 2, (out[1] - self.size) // 2
            x = x[..., top : top + self.size, left : left + self.size]
        mean, std = x.new_tensor(self.mean).view(1, 3, 1, 1), x.new_tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


def _tower_from_dir(cfg: VisionEncoderConfig, load: LoadOptions) -> tuple[nn.Module, str, bool]:
    folder = local_dir(cfg.pretrained, "vision")
    model_type = read_config(folder).get("model_type", "?")
    family = model_type.split("_")[0]
    if family not in _TOWERS:
        raise PandoraError(
            f"vision: '{folder}' holds a '{model_type}' model; expected a CLIP or SigLIP model or vision model "
            f"(model_type clip, clip_vision_model, siglip, siglip_vision_model)"
        )
    config_cls, model_cls = _TOWERS[family]
    if check_weights(folder, "vision", load) and not load.lazy:
        return model_cls.from_pretrained(folder, dtype=load.dtype), family, True
    if load.read_weights:  # lazy: the weights are read later, each rank its own shard
        config = config_cls.from_pretrained(folder)
        return build_empty(lambda: model_cls._from_config(config, dtype=load.dtype)), family, True
    with load.device():
        return model_cls(config_cls.from_pretrained(folder)), family, False


class VisionEncoder(nn.Module):
    """Frozen image tower. (N, 3, H, W) in [-1, 1] -> (N, gh, gw, D) patch features on their grid."""

    def __init__(self, cfg: VisionEncoderConfig, load: LoadOptions = LoadOptions()):
        super().__init__()
        self.cfg = cfg
        self.pretrained: dict[str, str] = {}  # submodule -> the folder its weights were read from
        if cfg.pretrained:
            self.tower, family, read = _tower_from_dir(cfg, load)
            if read:
                self.pretrained["tower"] = cfg.pretrained
            tower_cfg = self.tower.config
            self.processing = ImageProcessing.from_folder(Path(cfg.pretrained), tower_cfg.image_size, family)
        else:
            config_cls, model_cls = _TOWERS[cfg.kind]
            with load.device():
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
            self.processing = ImageProcessing(cfg.image_size, False, False, tuple(cfg.image_mean), tuple(cfg.image_std), "bilinear")
        if cfg.crop is not None:
            self.processing.crop = self.processing.shortest_edge = cfg.crop
        self.keep_aspect = cfg.crop is False
        self.image_size = self.tower.config.image_size
        self.patch_size = self.tower.config.patch_size
        self.hidden_size = self.tower.config.hidden_size
        # CLIP prepends a class token; SigLIP has none.
        self.skip_tokens = 1 if isinstance(self.tower, CLIPVisionModel) else 0

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The (gh, gw) patch grid that frames of (height, width) give."""
        if not self.keep_aspect:
            return (self.image_size // self.patch_size,) * 2
        h, w = self.processing.resized(height, width, True)
        return h // self.patch_size, w // self.patch_size

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        pixels = self.processing(frames, self.keep_aspect)
        gh, gw = self.grid(*frames.shape[-2:])
        extra = {"interpolate_pos_encoding": True} if self.keep_aspect else {}
        out = self.tower(pixel_values=pixels.to(self.tower.dtype), output_hidden_states=True, **extra)
        return out.hidden_states[self.cfg.feature_layer][:, self.skip_tokens :].unflatten(1, (gh, gw))
