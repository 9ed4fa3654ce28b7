"""The video generator slot: its config, the families it takes, and the one builder.

Families (one file each under models/generators/): `tiny` (pixel-space, tests and demo),
`i2vgen-xl`, `svd`, `wan` (a local diffusers folder in that release's layout). Every family offers
the same interface (see generators/base.py): context_dim, context_tokens, forward (the training pair), sample.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pandora_lightning.errors import PandoraError
from pandora_lightning.models.generators.i2vgen_xl import I2VGenXLGenerator
from pandora_lightning.models.generators.svd import SVDGenerator
from pandora_lightning.models.generators.tiny import TinyGenerator
from pandora_lightning.models.generators.wan import WanGenerator

FAMILIES = {"tiny": TinyGenerator, "i2vgen-xl": I2VGenXLGenerator, "svd": SVDGenerator, "wan": WanGenerator}
# How a folder names its family: model_index.json's pipeline, else the backbone's config class.
_PIPELINES = {
    "I2VGenXLPipeline": "i2vgen-xl",
    "StableVideoDiffusionPipeline": "svd",
    "WanPipeline": "wan",
    "WanImageToVideoPipeline": "wan",
}
_BACKBONES = {
    ("unet", "I2VGenXLUNet"): "i2vgen-xl",
    ("unet", "UNetSpatioTemporalConditionModel"): "svd",
    ("transformer", "WanTransformer3DModel"): "wan",
}


@dataclass
class GeneratorConfig:
    # tiny | i2vgen-xl | svd | wan; null: read from the pretrained folder (tiny without one)
    family: str | None = None
    pretrained: str | None = None  # local diffusers folder (model_index.json + unet|transformer/, vae/, scheduler/, ...)
    frames: int = 6  # frames per generated clip, the given ones included (16 in the reference; wan: 1 + 4k)
    cond_frames: int = 2  # given frames at the start of the clip (4 in the reference; wan: 1 + 4k)
    height: int = 32  # frame size in pixels (320 x 512 in the reference)
    width: int = 32
    num_inference_steps: int | None = None  # null: the family's default (tiny 20, i2vgen-xl 50, svd 25, wan 50)
    # Classifier-free guidance at sampling: pred = uncond + scale * (cond - uncond); 1.0 = off (one
    # backbone call a step instead of two). null: the family's default (tiny 1, i2vgen-xl 9, svd 3,
    # wan 5). The unconditional context is the adapter's answer to an empty text (svd: zeros, as
    # its pipeline); train with loss.text_dropout > 0 to use it.
    guidance_scale: float | None = None
    # Family micro-conditioning. svd: fps (its UNet sees fps - 1; default 7), motion bucket, noise
    # added to the given frames, and the guidance of the first frame (ramping to guidance_scale);
    # i2vgen-xl: the fps it is conditioned on (default 16).
    fps: int | None = None
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    min_guidance_scale: float = 1.0
    # --- tiny only: pixel space, frames pixel-unshuffled into patch_size**2 * 3 channels.
    # "spatiotemporal": SVD's UNet, run on every frame; "2d": one image UNet over the clip's frames
    # stacked as channels (3x cheaper a step at twice the width; the demo's, see models/generators/tiny.py).
    # Like the other tiny shape keys below, a pretrained family (which brings its own backbone) ignores it.
    unet: str = "spatiotemporal"
    patch_size: int = 2
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    attention_head_dim: int = 16
    cross_attention_dim: int = 64  # 1024 in the reference
    prediction_type: str = "v_prediction"
    # Diffuse the change from the last given frame instead of the frames themselves (as residual
    # video diffusion does): a static background is then exactly zero and the tiny model only has
    # to draw what moves.
    residual: bool = True
    beta_schedule: str = "squaredcos_cap_v2"
    # Training noise levels t = T * u ** (1 / timestep_power), u uniform: 1 is uniform, 2 a linear ramp
    # towards pure noise, where the clip has to come from the condition and the text.
    timestep_power: float = 1.0
    # This share of training clips takes its noise level from the num_inference_steps levels the
    # sampler visits (999, 899, ... 99 for 10 trailing DDIM steps) instead of the draw above: the
    # levels a rollout is made of train more often (0: off; docs/demo-model.md, "the sampler's noise levels"). Like cond_noise, a
    # pretrained family (its own noise levels) ignores it, so the tiny recipes stay templates.
    sampler_timesteps: float = 0.0
    # Training only: the given frames get Gaussian noise of a std drawn per clip in [0, cond_noise]
    # while the target stays the clean clip, so the generator learns to repair the small errors its
    # own earlier rounds leave in the frames a rollout gives it (0: off). Like cond_blur, a pretrained
    # family ignores it (svd has its own: noise_aug_strength), so the tiny recipes stay templates.
    cond_noise: float = 0.0
    # Training only: this share of clips has its given frames blended with a 3x3 binomial blur of
    # themselves, by a weight drawn uniformly in [0, 1], while the target stays the sharp clip: the
    # soft object rims a rollout's earlier rounds feed back, which the generator then learns to
    # sharpen instead of compounding them (0: off; docs/demo-model.md, "Rounds that compound"). A blur of
    # pixels, so like the shape keys a pretrained family (latent frames) ignores it.
    cond_blur: float = 0.0
    # Training on multi-round windows only: this share of the rounds after a window's first take as
    # given frames the generator's own draft of the round before (its x0 prediction from one noise
    # level, drawn uniformly from the lowest `cond_draft_noise` share of the schedule; no gradient)
    # instead of the real frames, so training sees the rims and colours a rollout hands on, and
    # learns to repair them (0: off; docs/demo-model.md, "Drafts"). At low noise
    # a draft keeps the state (where the object is, its size) and errs in the detail, as a rollout's
    # rounds do; from high noise it errs in the state too, and the model learns to pull sizes back.
    # Like cond_blur, a pretrained family ignores them.
    cond_draft: float = 0.0
    cond_draft_noise: float = 1.0
    added_time_ids: list[float] = field(default_factory=lambda: [7.0, 127.0, 0.02])

    def __post_init__(self):
        if self.family is not None and self.family not in FAMILIES:
            raise PandoraError(f"generator.family={self.family!r} is not one of {', '.join(FAMILIES)} (or null: read from the folder)")
        if self.family == "tiny" and self.pretrained:
            raise PandoraError("generator.family=tiny is built from its config; it takes no generator.pretrained folder")
        if self.family not in (None, "tiny") and not self.pretrained:
            raise PandoraError(f"generator.family={self.family} needs generator.pretrained: a local folder in its diffusers layout")
        if self.guidance_scale is not None and self.guidance_scale < 1.0:
            raise PandoraError(f"generator.guidance_scale={self.guidance_scale} must be >= 1 (1 = no guidance)")
        if not 0 < self.cond_frames < self.frames:
            raise PandoraError(f"generator.cond_frames={self.cond_frames} must be in [1, generator.frames={self.frames})")
        if self.timestep_power <= 0 or self.cond_noise < 0:
            raise PandoraError(f"generator.timestep_power={self.timestep_power} must be > 0 and generator.cond_noise={self.cond_noise} >= 0")
        if not 0.0 <= self.cond_blur <= 1.0:
            raise PandoraError(f"generator.cond_blur={self.cond_blur} is a share of clips: give a value in [0, 1]")
        if not 0.0 <= self.cond_draft <= 1.0:
            raise PandoraError(f"generator.cond_draft={self.cond_draft} is a share of rounds: give a value in [0, 1]")
        if not 0.0 < self.cond_draft_noise <= 1.0:
            raise PandoraError(f"generator.cond_draft_noise={self.cond_draft_noise} is a share of the noise schedule: give a value in (0, 1]")
        if not 0.0 <= self.sampler_timesteps <= 1.0:
            raise PandoraError(f"generator.sampler_timesteps={self.sampler_timesteps} is a share of clips: give a value in [0, 1]")
        if self.pretrained is not None and self.timestep_power != 1.0:
            raise PandoraError(f"generator.timestep_power={self.timestep_power} is an option of the tiny generator; a "
                               "pretrained family draws its own noise levels: drop it")
        if self.unet not in ("spatiotemporal", "2d"):
            raise PandoraError(f"generator.unet={self.unet!r} must be 'spatiotemporal' or '2d' (the tiny generator's UNet)")
        if self.pretrained is None:
            if any(c % 32 for c in self.block_out_channels):
                raise PandoraError(
                    f"generator.block_out_channels={list(self.block_out_channels)}: the tiny UNets "
                    f"use GroupNorm(32), so every width must be a multiple of 32"
                )
            check_size(self.size, self.patch_size * 2 ** (len(self.block_out_channels) - 1), "patch_size x 2^(levels-1)")

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of every frame."""
        return self.height, self.width


def check_size(size: tuple[int, int], multiple: int, why: str) -> None:
    """Frames must divide evenly down to the backbone's coarsest level."""
    if min(size) < 1 or size[0] % multiple or size[1] % multiple:
        raise PandoraError(
            f"generator.height x generator.width = {size[0]}x{size[1]}: both must be multiples of {multiple} "
            f"({why}) so every level has a whole number of positions"
        )


def infer_family(folder: Path) -> str:
    """The family of a diffusers folder, from model_index.json, else from its backbone's config."""
    index = folder / "model_index.json"
    if index.is_file():
        name = json.loads(index.read_text()).get("_class_name")
        if name in _PIPELINES:
            return _PIPELINES[name]
    for (sub, name), family in _BACKBONES.items():
        config = folder / sub / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("_class_name") == name:
            return family
    raise PandoraError(
        f"generator.pretrained '{folder}': cannot tell its family; looked for model_index.json naming "
        f"{', '.join(_PIPELINES)}, then unet/config.json ({', '.join(n for (s, n) in _BACKBONES if s == 'unet')}) and "
        f"transformer/config.json (WanTransformer3DModel); supported families: {', '.join(f for f in FAMILIES if f != 'tiny')}"
    )


def build_generator(cfg: GeneratorConfig, init: str = "weights", dtype: torch.dtype | None = torch.float32,
                    frozen_init: str | None = None):
    """The generator `cfg` names: tiny from its config, a family from its folder (init: weights | random | meta;
    `frozen_init`: the same for the family's `frozen_parts`, e.g. meta when precomputed inputs replace them)."""
    if not cfg.pretrained:
        return TinyGenerator(cfg)
    folder = Path(cfg.pretrained).expanduser()
    if not folder.is_dir():
        raise PandoraError(
            f"generator.pretrained '{cfg.pretrained}' is not a local directory; download the weights beforehand "
            f"(no hub access at run time) or set it to null for the tiny generator"
        )
    found = infer_family(folder)
    if cfg.family is not None and cfg.family != found:
        raise PandoraError(f"generator.family={cfg.family} but '{folder}' holds a {found} model; set generator.family={found} or null")
    return FAMILIES[found](cfg, folder, init=init, dtype=dtype, frozen_init=frozen_init)
