"""Video generator: a diffusers video UNet + noise schedule, in pixel space or in a VAE's latent space.

The clip has `frames` frames; the first `cond_frames` of them are given (the start image, or the
last frames of the previous round) and reach the UNet as extra input channels, as in image-to-video
models that concatenate the condition latents. The LLM side arrives as the cross-attention context.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    AutoencoderKLTemporalDecoder,
    DDIMScheduler,
    DDPMScheduler,
    UNet3DConditionModel,
    UNetSpatioTemporalConditionModel,
)
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from pandora_lightning.models.loading import local_dir

# Video UNets whose forward takes (sample, timestep, encoder_hidden_states, ...). SVD-family UNets
# want (B, T, C, H, W) plus micro-conditioning ids; UNet3D wants (B, C, T, H, W).
_UNETS = {"UNetSpatioTemporalConditionModel": UNetSpatioTemporalConditionModel, "UNet3DConditionModel": UNet3DConditionModel}
_VAES = {"AutoencoderKL": AutoencoderKL, "AutoencoderKLTemporalDecoder": AutoencoderKLTemporalDecoder}


@dataclass
class GeneratorConfig:
    pretrained: str | None = None  # local diffusers dir with unet/, scheduler/ and optionally vae/; null = tiny
    frames: int = 6  # frames per generated clip, the given ones included (16 in the reference)
    cond_frames: int = 2  # given frames at the start of the clip (4 in the reference)
    image_size: int = 32
    # Tiny pixel space: frames are pixel-unshuffled into patch_size**2 * 3 channels (4x fewer positions).
    patch_size: int = 2
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    attention_head_dim: int = 16
    cross_attention_dim: int = 64  # 1024 in the reference
    # Noise schedule of the tiny generator; a pretrained one uses its own scheduler/ config instead.
    prediction_type: str = "v_prediction"
    # Diffuse the change from the last given frame instead of the frames themselves (as residual
    # video diffusion does): a static background is then exactly zero and the tiny model only has
    # to draw what moves. None = on for the tiny generator, off for pretrained UNets (which were
    # trained on whole latents).
    residual: bool | None = None
    beta_schedule: str = "squaredcos_cap_v2"
    num_inference_steps: int = 20
    # Classifier-free guidance at sampling: pred = uncond + scale * (cond - uncond), where the
    # unconditional context is the adapter's answer to an empty text; 1.0 = off (one UNet call a
    # step instead of two). Needs a model trained with loss.text_dropout > 0.
    guidance_scale: float = 1.0
    # SVD micro-conditioning (fps - 1, motion bucket id, noise augmentation strength).
    added_time_ids: list[float] = field(default_factory=lambda: [7.0, 127.0, 0.02])

    def __post_init__(self):
        if self.residual is None:
            self.residual = self.pretrained is None
        if self.guidance_scale < 1.0:
            raise ValueError(f"generator.guidance_scale={self.guidance_scale} must be >= 1 (1 = no guidance)")
        if not 0 < self.cond_frames < self.frames:
            raise ValueError(f"generator.cond_frames={self.cond_frames} must be in [1, generator.frames={self.frames})")
        if self.pretrained is None:
            if any(c % 32 for c in self.block_out_channels):
                raise ValueError(
                    f"generator.block_out_channels={list(self.block_out_channels)}: the spatio-temporal UNet "
                    f"uses GroupNorm(32), so every width must be a multiple of 32"
                )
            stride = self.patch_size * 2 ** (len(self.block_out_channels) - 1)
            if self.image_size % stride:
                raise ValueError(
                    f"generator.image_size={self.image_size} must be a multiple of {stride} "
                    f"(patch_size x 2^(levels-1)) so every UNet level has a whole number of pixels"
                )


def _tiny_unet(cfg: GeneratorConfig, channels: int) -> nn.Module:
    levels = len(cfg.block_out_channels)
    return UNetSpatioTemporalConditionModel(
        sample_size=cfg.image_size // cfg.patch_size,
        in_channels=2 * channels + 1,
        out_channels=channels,
        down_block_types=("DownBlockSpatioTemporal",) + ("CrossAttnDownBlockSpatioTemporal",) * (levels - 1),
        up_block_types=("CrossAttnUpBlockSpatioTemporal",) * (levels - 1) + ("UpBlockSpatioTemporal",),
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.cross_attention_dim,
        num_attention_heads=tuple(max(1, c // cfg.attention_head_dim) for c in cfg.block_out_channels),
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * len(cfg.added_time_ids),
    )


def _load_component(folder: Path, sub: str, registry: dict, what: str) -> nn.Module:
    path = local_dir(str(folder / sub), f"generator {what}")
    class_name = json.loads((path / "config.json").read_text()).get("_class_name")
    if class_name not in registry:
        raise ValueError(f"generator {what}: '{path}' holds a {class_name}; supported: {sorted(registry)}")
    return registry[class_name].from_pretrained(path)


class VideoGenerator(nn.Module):
    """Latent video diffusion: clips (B, T, 3, H, W) in [-1, 1] <-> latents (B, T, C, h, w)."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        self.vae = None
        if cfg.pretrained:
            folder = Path(cfg.pretrained)
            self.unet = _load_component(folder, "unet", _UNETS, "unet")
            schedule = DDPMScheduler.load_config(local_dir(str(folder / "scheduler"), "generator scheduler", "scheduler_config.json"))
            if (folder / "vae").is_dir():
                self.vae = _load_component(folder, "vae", _VAES, "vae")
        else:
            self.unet = _tiny_unet(cfg, 3 * cfg.patch_size**2)
            schedule = dict(
                num_train_timesteps=1000, beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type, clip_sample=False
            )
        self.train_scheduler = DDPMScheduler.from_config(schedule)
        self.sample_scheduler = DDIMScheduler.from_config(schedule, timestep_spacing="trailing")
        self.channels = self.vae.config.latent_channels if self.vae else 3 * cfg.patch_size**2
        self.mask_channel = self.unet.config.in_channels - 2 * self.channels
        if self.mask_channel not in (0, 1) or self.unet.config.out_channels != self.channels:
            raise ValueError(
                f"generator: the UNet takes {self.unet.config.in_channels} channels in and "
                f"{self.unet.config.out_channels} out; with {self.channels} latent channels it must take "
                f"{2 * self.channels} (noisy + condition) or {2 * self.channels + 1} (+ mask) in and {self.channels} out"
            )
        self.frames_first = isinstance(self.unet, UNetSpatioTemporalConditionModel)
        self.register_buffer("added_time_ids", torch.tensor(cfg.added_time_ids), persistent=False)

    @property
    def context_dim(self) -> int:
        return self.unet.config.cross_attention_dim

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        b, t = frames.shape[:2]
        flat = frames.flatten(0, 1)
        if self.vae is None:
            latents = F.pixel_unshuffle(flat, self.cfg.patch_size)
        else:
            latents = self.vae.encode(flat.to(self.vae.dtype)).latent_dist.mode() * self.vae.config.scaling_factor
        return latents.unflatten(0, (b, t))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, t = latents.shape[:2]
        flat = latents.flatten(0, 1)
        if self.vae is None:
            frames = F.pixel_shuffle(flat, self.cfg.patch_size)
        else:
            z = flat.to(self.vae.dtype) / self.vae.config.scaling_factor
            extra = {"num_frames": t} if isinstance(self.vae, AutoencoderKLTemporalDecoder) else {}
            frames = self.vae.decode(z, **extra).sample
        return frames.unflatten(0, (b, t)).clamp(-1, 1)

    def condition(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, T, C, h, w) -> condition channels: the given frames, then the last given frame repeated (+ a mask).

        Repeating the last state into every new position (as SVD repeats its image latent) lets
        each output frame see the current state directly, so the UNet only has to learn the change.
        """
        n = self.cfg.cond_frames
        cond = torch.cat([latents[:, :n], latents[:, n - 1 : n].expand(-1, latents.shape[1] - n, -1, -1, -1)], dim=1)
        if self.mask_channel:
            mask = torch.zeros_like(latents[:, :, :1])
            mask[:, :n] = 1
            cond = torch.cat([cond, mask], dim=2)
        return cond

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """One UNet call. noisy (B, T, C, h, w), cond from `condition`, context (B, N, Dctx) -> (B, T, C, h, w)."""
        sample = torch.cat([noisy, cond], dim=2)
        context = context.to(self.unet.dtype)
        if self.frames_first:
            ids = self.added_time_ids.to(sample.dtype).expand(sample.shape[0], -1)
            return self.unet(sample.to(self.unet.dtype), timesteps, context, ids).sample
        out = self.unet(sample.transpose(1, 2).to(self.unet.dtype), timesteps, context).sample
        return out.transpose(1, 2)

    def anchor(self, latents: torch.Tensor) -> torch.Tensor:
        """What the diffused signal is relative to: the last given frame (residual mode) or nothing."""
        if not self.cfg.residual:
            return torch.zeros_like(latents[:, :1])
        return latents[:, self.cfg.cond_frames - 1 : self.cfg.cond_frames]

    def prepare(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip (B, T, 3, H, W) -> (clean diffusion target x0, condition channels), both (B, T, ., h, w)."""
        latents = self.encode(frames)
        return latents - self.anchor(latents), self.condition(latents)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.train_scheduler.config.prediction_type == "v_prediction":
            return self.train_scheduler.get_velocity(x0, noise, timesteps)
        if self.train_scheduler.config.prediction_type == "sample":
            return x0
        return noise

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.train_scheduler.add_noise(x0, noise, timesteps)

    def guided(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor | None):
        """One denoising prediction, with classifier-free guidance when an unconditional context is given."""
        b = x.shape[0]
        if uncond is None:
            return self(x, t.expand(b), cond, context).to(x.dtype)
        both = self(torch.cat([x, x]), t.expand(2 * b), torch.cat([cond, cond]), torch.cat([context, uncond]))
        with_text, without = both.to(x.dtype).chunk(2)
        return without + self.cfg.guidance_scale * (with_text - without)

    @torch.no_grad()
    def sample(
        self,
        given: torch.Tensor,
        context: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        uncond_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """given (B, cond_frames, 3, H, W), context (B, N, Dctx) -> clip (B, frames, 3, H, W), given frames first.

        uncond_context (B, N, Dctx), the context of an empty text, turns on classifier-free guidance.
        A list of B generators gives every sample its own noise, whatever else is in the batch.
        """
        b, n = given.shape[:2]
        known = self.encode(given)
        shape = (b, self.cfg.frames, *known.shape[2:])
        # Only the first n positions are read by `condition` and `anchor`.
        padded = torch.cat([known, known.new_zeros(b, self.cfg.frames - n, *known.shape[2:])], dim=1)
        cond = self.condition(padded)
        x = randn_tensor(shape, generator=generator, device=known.device, dtype=known.dtype)
        scheduler = self.sample_scheduler
        scheduler.set_timesteps(self.cfg.num_inference_steps, device=known.device)
        for t in scheduler.timesteps:
            x = scheduler.step(self.guided(x, t, cond, context, uncond_context), t, x).prev_sample
        latents = x + self.anchor(padded)
        latents[:, :n] = known
        clip = self.decode(latents)
        clip[:, :n] = given
        return clip
