"""Stable Video Diffusion: UNetSpatioTemporalConditionModel + AutoencoderKLTemporalDecoder, EDM / Euler.

As StableVideoDiffusionPipeline does: the given image, with `noise_aug_strength` of noise added,
is VAE-encoded (its mode, NOT multiplied by the scaling factor) and repeated along time on the
channel axis; the UNet is micro-conditioned on (fps - 1, motion bucket, noise augmentation); the
cross-attention takes what was the CLIP image embedding, here the output adapter's tokens (there
is no text encoder, so no distillation teacher). With several given frames their latents are
tiled along time (one frame: exactly SVD's repeat).

Training is EDM with SVD's v-parametrisation (Karras et al.; c_in = 1/sqrt(s^2+1), c_noise =
log(s)/4, c_skip = 1/(s^2+1), c_out = -s/sqrt(s^2+1)) and the EDM weight (s^2+1)/s^2, which makes
the loss a plain MSE of the UNet output to (noise - s x0)/sqrt(s^2+1). Sampling is the folder's
EulerDiscreteScheduler with the pipeline's per-frame guidance ramp.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
from diffusers.utils.torch_utils import randn_tensor

from pandora_lightning.errors import PandoraError
from pandora_lightning.models.generators.base import FamilyGenerator, UNetDenoiser, freeze, load_part, tile_frames

# peft target modules (module-name suffixes) for LoRA on this family's UNet: spatial and temporal
# self/cross-attention projections ("transformer_blocks" spatial, "temporal_transformer_blocks" temporal).
LORA_ATTENTION_MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
LORA_TEMPORAL_PATTERN = r".*temporal_transformer_blocks.*\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)$"
LORA_FFN_MODULES = ("ff.net.0.proj", "ff.net.2")


class SVDGenerator(UNetDenoiser, FamilyGenerator):
    family = "svd"
    has_text_teacher = False
    default_steps = 25
    default_guidance = 3.0  # the pipeline's max_guidance_scale; min_guidance_scale ramps from the first frame
    default_fps = 7
    # EDM training noise: log(sigma) ~ N(P_MEAN, P_STD^2), shifted to high noise as in SVD fine-tuning.
    P_MEAN, P_STD = 0.7, 1.6
    precompute_refusal = ("it conditions on VAE latents of the given frames with fresh noise added at every step "
                          "(noise_aug_strength), which stored latents cannot reproduce")

    def __init__(self, cfg, folder: Path, init: str = "weights", dtype: torch.dtype | None = None, frozen_init: str | None = None):
        super().__init__(cfg, folder)
        self.unet = load_part(folder, "unet", {"UNetSpatioTemporalConditionModel": UNetSpatioTemporalConditionModel}, init, dtype)
        self.vae = freeze(load_part(folder, "vae", {"AutoencoderKLTemporalDecoder": AutoencoderKLTemporalDecoder}, init, dtype))
        self.scheduler = EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
        self.fps = cfg.fps or self.default_fps
        self.scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        ids = self.unet.config.addition_time_embed_dim * 3
        if self.unet.add_embedding.linear_1.in_features != ids:
            raise PandoraError(f"generator '{folder}': the UNet's added time embedding takes {self.unet.add_embedding.linear_1.in_features} values, SVD gives {ids}")
        self.check_size(self.scale, "its VAE's downscale")

    context_key = "unet/config.json cross_attention_dim"  # where the cross-attention width is set

    @property
    def needs_uncond_context(self) -> bool:
        return False  # SVD's unconditional branch is all zeros (image embedding and image latents)

    def added_time_ids(self, batch: int, device) -> torch.Tensor:
        ids = [self.fps - 1, self.cfg.motion_bucket_id, self.cfg.noise_aug_strength]
        return torch.tensor([ids], device=device).repeat(batch, 1)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> scaled latents (B, T, 4, h, w), the diffused space."""
        z = self.vae.encode(frames.flatten(0, 1).to(self.vae.dtype)).latent_dist.mode()
        return (z.float() * self.vae.config.scaling_factor).unflatten(0, frames.shape[:2])

    @torch.no_grad()
    def condition(self, given: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """given (B, k, 3, H, W) + noise like it -> image latents (B, frames, 4, h, w): unscaled, noise-augmented, tiled."""
        noisy = (given + self.cfg.noise_aug_strength * noise).flatten(0, 1)
        z = self.vae.encode(noisy.to(self.vae.dtype)).latent_dist.mode().float()
        return tile_frames(z.unflatten(0, given.shape[:2]), self.cfg.frames, dim=1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, t = latents.shape[:2]
        z = latents.flatten(0, 1) / self.vae.config.scaling_factor
        frames = self.vae.decode(z.to(self.vae.dtype), num_frames=t).sample
        return frames.float().unflatten(0, (b, t)).clamp(-1, 1)

    def unet_out(self, x: torch.Tensor, sigma_input: torch.Tensor, cond: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """UNet on already scaled input x (B, T, 4, h, w) at timestep input c_noise (B,)."""
        sample = torch.cat([x, cond], dim=2).to(self.unet.dtype)
        ids = self.added_time_ids(x.shape[0], x.device).to(self.unet.dtype)
        return self.unet(sample, sigma_input, context.to(self.unet.dtype), ids).sample.float()

    def draw_sigma(self, batch: int, device, generator=None) -> torch.Tensor:
        return (self.P_MEAN + self.P_STD * torch.randn(batch, device=device, generator=generator)).exp()

    def forward(self, frames, context, noise=None, sigma=None):
        """frames (B, T, 3, H, W) -> (UNet output, v target) on the new frames, both (B, T - k, 4, h, w)."""
        k = self.cfg.cond_frames
        x0 = self.encode(frames)
        cond = self.condition(frames[:, :k], torch.randn_like(frames[:, :k]))
        noise = torch.randn_like(x0) if noise is None else noise
        sigma = self.draw_sigma(x0.shape[0], x0.device) if sigma is None else sigma
        s = sigma.view(-1, 1, 1, 1, 1)
        c_in = 1 / (s**2 + 1).sqrt()
        pred = self.unet_out((x0 + s * noise) * c_in, 0.25 * sigma.log(), cond, context)
        target = (noise - s * x0) / (s**2 + 1).sqrt()
        return pred[:, k:], target[:, k:]

    @torch.no_grad()
    def sample(self, given, context, generator=None, uncond_context=None, image=None):
        """StableVideoDiffusionPipeline's loop on our context. given (B, k, 3, H, W) -> (B, frames, 3, H, W)."""
        b, k = given.shape[:2]
        device = given.device
        cond = self.condition(given, randn_tensor(given.shape, generator=generator, device=device, dtype=given.dtype))
        scheduler = self.scheduler
        scheduler.set_timesteps(self.num_inference_steps, device=device)
        h, w = given.shape[-2] // self.scale, given.shape[-1] // self.scale
        shape = (b, self.cfg.frames, self.vae.config.latent_channels, h, w)
        x = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) * scheduler.init_noise_sigma
        guide = self.guidance_scale > 1
        if guide:
            ramp = torch.linspace(self.cfg.min_guidance_scale, self.guidance_scale, self.cfg.frames, device=device)
            ramp = ramp.view(1, -1, 1, 1, 1)
            cond = torch.cat([torch.zeros_like(cond), cond])
            context = torch.cat([torch.zeros_like(context), context])
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([x, x]) if guide else x, t)
            out = self.unet_out(inp, t.expand(inp.shape[0]), cond, context)
            if guide:
                uncond, cond_out = out.chunk(2)
                out = uncond + ramp * (cond_out - uncond)
            x = scheduler.step(out, t, x).prev_sample
        clip = self.decode(x)
        return clip
