"""The tiny generator of the tests and the demo: a small UNet in pixel space.

The clip has `frames` frames; the first `cond_frames` of them are given (the start image, or the
last frames of the previous round) and reach the UNet as extra input channels, as image-to-video
models concatenate their condition latents. The LLM side arrives as the cross-attention context.
Frames are pixel-unshuffled into patch_size**2 * 3 channels (4x fewer positions at patch 2).

Two UNets (`generator.unet`): "spatiotemporal", SVD's UNet (the same block names, spatial and
temporal layers run on every frame), and "2d", one image UNet that sees the whole clip with its
frames stacked as channels: a short, small clip then costs one image instead of `frames` of them
(3x less compute a step than the spatio-temporal UNet at twice its width), which is what lets the
demo train in minutes on a CPU. Real generator families are always spatio-temporal.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNetSpatioTemporalConditionModel
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from pandora_lightning.models.generators.base import UNetDenoiser

# peft target modules for LoRA on the tiny UNet (the same block names as the SVD family).
LORA_ATTENTION_MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


def _tiny_unet(cfg, channels: int) -> nn.Module:
    levels = len(cfg.block_out_channels)
    heads = tuple(max(1, c // cfg.attention_head_dim) for c in cfg.block_out_channels)
    shared = dict(sample_size=[s // cfg.patch_size for s in cfg.size], block_out_channels=tuple(cfg.block_out_channels),
                  layers_per_block=cfg.layers_per_block, cross_attention_dim=cfg.cross_attention_dim)
    if cfg.unet == "2d":  # the clip's frames stacked as channels: (T * (2C + 1)) in, (T * C) out
        return UNet2DConditionModel(
            in_channels=cfg.frames * (2 * channels + 1),
            out_channels=cfg.frames * channels,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
            attention_head_dim=heads,  # diffusers' 2D UNet reads this argument as the number of heads (its own note)
            # The context, attention-pooled, is also added to the time embedding, so the action reaches
            # every ResNet and not only the cross-attention of the coarse levels: without it one seed
            # in three never learned to follow the text (docs/history.md, stop 10).
            addition_embed_type="text",
            addition_embed_type_num_heads=max(1, cfg.cross_attention_dim // cfg.attention_head_dim),
            **shared,
        )
    return UNetSpatioTemporalConditionModel(
        in_channels=2 * channels + 1,
        out_channels=channels,
        down_block_types=("DownBlockSpatioTemporal",) + ("CrossAttnDownBlockSpatioTemporal",) * (levels - 1),
        up_block_types=("CrossAttnUpBlockSpatioTemporal",) * (levels - 1) + ("UpBlockSpatioTemporal",),
        num_attention_heads=heads,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * len(cfg.added_time_ids),
        **shared,
    )


class TinyGenerator(UNetDenoiser, nn.Module):
    """Pixel-space video diffusion: clips (B, T, 3, H, W) in [-1, 1] <-> (B, T, 3 p^2, H / p, W / p)."""

    family = "tiny"
    has_text_teacher = True  # the tiny random CLIP text encoder of the world model
    context_tokens = None
    # Pixel space: no VAE, nothing of the generator's to precompute (its "latents" are the pixels).
    frozen_parts: tuple[str, ...] = ()
    precompute_refusal = None
    needs_frames = True

    def precompute(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.channels = 3 * cfg.patch_size**2
        self.unet = _tiny_unet(cfg, self.channels)
        schedule = dict(num_train_timesteps=1000, beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type, clip_sample=False)
        self.train_scheduler = DDPMScheduler.from_config(schedule)
        self.sample_scheduler = DDIMScheduler.from_config(schedule, timestep_spacing="trailing")
        if cfg.sampler_timesteps > 0:  # the levels the sampler visits, drawn by training_timesteps
            sampler = DDIMScheduler.from_config(self.sample_scheduler.config)
            sampler.set_timesteps(self.num_inference_steps)
            self.sampler_levels = sampler.timesteps.clone()
        self.register_buffer("added_time_ids", torch.tensor(cfg.added_time_ids), persistent=False)

    @property
    def num_inference_steps(self) -> int:
        return self.cfg.num_inference_steps or 20

    @property
    def guidance_scale(self) -> float:
        return 1.0 if self.cfg.guidance_scale is None else self.cfg.guidance_scale

    context_key = "generator.cross_attention_dim"  # where the cross-attention width is set

    @property
    def needs_uncond_context(self) -> bool:
        return self.guidance_scale > 1

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(frames.flatten(0, 1), self.cfg.patch_size).unflatten(0, frames.shape[:2])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents.flatten(0, 1), self.cfg.patch_size).unflatten(0, latents.shape[:2]).clamp(-1, 1)

    def condition(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, T, C, h, w) -> condition channels: the given frames, then the last given frame repeated, + a mask.

        Repeating the last state into every new position (as SVD repeats its image latent) lets
        each output frame see the current state directly, so the UNet only has to learn the change.
        """
        n = self.cfg.cond_frames
        cond = torch.cat([latents[:, :n], latents[:, n - 1 : n].expand(-1, latents.shape[1] - n, -1, -1, -1)], dim=1)
        mask = torch.zeros_like(latents[:, :, :1])
        mask[:, :n] = 1
        return torch.cat([cond, mask], dim=2)

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """One UNet call. noisy (B, T, C, h, w), cond from `condition`, context (B, N, Dctx) -> (B, T, C, h, w)."""
        sample = torch.cat([noisy, cond], dim=2).to(self.unet.dtype)
        if self.cfg.unet == "2d":
            out = self.unet(sample.flatten(1, 2), timesteps, context.to(self.unet.dtype)).sample
            return out.unflatten(1, noisy.shape[1:3])
        ids = self.added_time_ids.to(sample.dtype).expand(sample.shape[0], -1)
        return self.unet(sample, timesteps, context.to(self.unet.dtype), ids).sample

    def anchor(self, latents: torch.Tensor) -> torch.Tensor:
        """What the diffused signal is relative to: the last given frame (residual mode) or nothing."""
        if not self.cfg.residual:
            return torch.zeros_like(latents[:, :1])
        return latents[:, self.cfg.cond_frames - 1 : self.cfg.cond_frames]

    def blur_given(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, T, 3, H, W) with the given ones of a `cond_blur` share of clips blended with their 3x3
        binomial blur by a weight drawn uniformly in [0, 1] per clip; the new frames are left as they are."""
        n, b = self.cfg.cond_frames, frames.shape[0]
        taps = frames.new_tensor([1.0, 2.0, 1.0])
        kernel = (taps[:, None] * taps[None, :] / 16).expand(3, 1, 3, 3)
        given = frames[:, :n].flatten(0, 1)
        blurred = F.conv2d(F.pad(given, (1, 1, 1, 1), mode="replicate"), kernel, groups=3).unflatten(0, (b, n))
        shape = (b, 1, 1, 1, 1)
        chosen = torch.rand(shape, device=frames.device) < self.cfg.cond_blur
        weight = torch.rand(shape, device=frames.device, dtype=frames.dtype) * chosen
        return torch.cat([frames[:, :n] + weight * (blurred - frames[:, :n]), frames[:, n:]], dim=1)

    def forward(self, frames, context, noise=None, timesteps=None, encoded=None):
        """The training pair: frames (B, T, 3, H, W) -> (UNet output, target of the prediction type) on the new frames.
        `encoded` (precomputed inputs) is not used: the tiny generator works on the pixels."""
        n = self.cfg.cond_frames
        latents = self.encode(frames)
        given = self.encode(self.blur_given(frames)) if self.training and self.cfg.cond_blur > 0 else latents
        if self.training and self.cfg.cond_noise > 0:
            sigma = torch.rand(latents.shape[0], 1, 1, 1, 1, device=latents.device, dtype=latents.dtype) * self.cfg.cond_noise
            noisy = given[:, :n] + sigma * torch.randn_like(given[:, :n])
            given = torch.cat([noisy, given[:, n:]], dim=1)
        x0, cond = latents - self.anchor(given), self.condition(given)
        noise = torch.randn_like(x0) if noise is None else noise
        if timesteps is None:
            timesteps = self.training_timesteps(x0.shape[0], x0.device)
        pred = self.denoise(self.train_scheduler.add_noise(x0, noise, timesteps), timesteps, cond, context)
        kind = self.train_scheduler.config.prediction_type
        if kind == "v_prediction":
            target = self.train_scheduler.get_velocity(x0, noise, timesteps)
        else:
            target = x0 if kind == "sample" else noise
        return pred[:, n:], target[:, n:]

    @torch.no_grad()
    def draft(self, frames: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """frames (B, T, 3, H, W), context (B, N, Dctx) -> the clip the UNet predicts in one call from the real
        clip noised to a level drawn uniformly from the lowest `cond_draft_noise` share of the schedule (its x0
        prediction), given frames kept: a draft with the model's own errors, cheaper than a rollout by the
        sampler's step count (`cond_draft`)."""
        n = self.cfg.cond_frames
        latents = self.encode(frames)
        anchor, cond = self.anchor(latents), self.condition(latents)
        x0 = latents - anchor
        top = max(1, round(self.train_scheduler.config.num_train_timesteps * self.cfg.cond_draft_noise))
        timesteps = torch.randint(top, (x0.shape[0],), device=x0.device)
        noisy = self.train_scheduler.add_noise(x0, torch.randn_like(x0), timesteps)
        pred = self.denoise(noisy, timesteps, cond, context).to(x0.dtype)
        kind = self.train_scheduler.config.prediction_type
        if kind != "sample":
            ab = self.train_scheduler.alphas_cumprod.to(x0.device, x0.dtype)[timesteps].view(-1, 1, 1, 1, 1)
            if kind == "v_prediction":
                pred = ab.sqrt() * noisy - (1 - ab).sqrt() * pred
            else:  # epsilon
                pred = (noisy - (1 - ab).sqrt() * pred) / ab.sqrt()
        clip = self.decode(pred + anchor)
        return torch.cat([frames[:, :n], clip[:, n:]], dim=1)

    def training_timesteps(self, batch: int, device: torch.device) -> torch.Tensor:
        """A training batch's noise levels: T * u ** (1 / timestep_power), u uniform; a `sampler_timesteps`
        share of the clips takes one of the levels the sampler visits instead (its num_inference_steps)."""
        total = self.train_scheduler.config.num_train_timesteps
        u = torch.rand(batch, device=device) ** (1 / self.cfg.timestep_power)
        timesteps = (u * total).long().clamp(max=total - 1)
        if self.cfg.sampler_timesteps > 0:
            levels = self.sampler_levels.to(device)
            visited = levels[torch.randint(len(levels), (batch,), device=device)]
            timesteps = torch.where(torch.rand(batch, device=device) < self.cfg.sampler_timesteps, visited, timesteps)
        return timesteps

    def guided(self, x, t, cond, context, uncond):
        """One denoising prediction, with classifier-free guidance when an unconditional context is given."""
        b = x.shape[0]
        if uncond is None:
            return self.denoise(x, t.expand(b), cond, context).to(x.dtype)
        both = self.denoise(torch.cat([x, x]), t.expand(2 * b), torch.cat([cond, cond]), torch.cat([context, uncond]))
        with_text, without = both.to(x.dtype).chunk(2)
        return without + self.guidance_scale * (with_text - without)

    @torch.no_grad()
    def sample(self, given, context, generator=None, uncond_context=None, image=None):
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
        scheduler.set_timesteps(self.num_inference_steps, device=known.device)
        for t in scheduler.timesteps:
            x = scheduler.step(self.guided(x, t, cond, context, uncond_context), t, x).prev_sample
        latents = x + self.anchor(padded)
        latents[:, :n] = known
        clip = self.decode(latents)
        clip[:, :n] = given
        return clip
