"""I2VGen-XL: I2VGenXLUNet + AutoencoderKL + CLIP text encoder (the teacher) + CLIP image encoder, DDIM.

The closest diffusers-native relative of the reference's DynamiCrafter: text cross-attention plus an
image stream. As I2VGenXLPipeline does: the output adapter's tokens take the place of the CLIP text
embedding; the image stream sees the CLIP image embedding of the start image (its centre square)
and the VAE latent of the given frame followed by per-frame position maps ((j - k + 1) / (T - k)
for new frame j; one given frame: exactly the pipeline's), and the UNet is conditioned on fps.
With several given frames their latents fill the first positions.

Training uses the folder's noise schedule (DDPM forward process of the DDIM config, zero terminal
SNR included) and its prediction type (v in the release); sampling is the folder's DDIMScheduler,
50 steps and guidance 9 as the pipeline's defaults, the unconditional branch being the adapter's
answer to the empty text (the pipeline's empty negative prompt) and a zero image embedding.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, I2VGenXLUNet
from diffusers.utils.torch_utils import randn_tensor
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

from pandora_lightning.errors import PandoraError
from pandora_lightning.models.generators.base import FamilyGenerator, UNetDenoiser, PromptEncoder, clip_pixels, freeze, load_part, read_processor

# peft target modules (module-name suffixes) for LoRA on this family's UNet: spatial ("attentions")
# and temporal ("temp_attentions", "transformer_in") attention projections.
LORA_ATTENTION_MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
LORA_TEMPORAL_PATTERN = r".*(temp_attentions|transformer_in).*\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)$"
LORA_FFN_MODULES = ("ff.net.0.proj", "ff.net.2")


def encode_prompt(model, tokenizer, texts: list[str], length: int) -> torch.Tensor:
    """I2VGenXLPipeline.encode_prompt with its default clip_skip=1: the penultimate layer, final layer norm."""
    ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    hidden = model(ids.to(model.device), output_hidden_states=True).hidden_states[-2]
    return getattr(model, "text_model", model).final_layer_norm(hidden)  # transformers 5 flattened text_model


class I2VGenXLGenerator(UNetDenoiser, FamilyGenerator):
    family = "i2vgen-xl"
    default_steps = 50
    default_guidance = 9.0
    default_fps = 16  # the pipeline's target_fps
    frozen_parts = ("vae", "image_encoder")

    def __init__(self, cfg, folder: Path, init: str = "weights", dtype: torch.dtype | None = None, frozen_init: str | None = None):
        """`frozen_init`: how the VAE and image encoder are built when not as `init` (meta: precomputed inputs)."""
        super().__init__(cfg, folder)
        self.unet = load_part(folder, "unet", {"I2VGenXLUNet": I2VGenXLUNet}, init, dtype)
        self.vae = freeze(load_part(folder, "vae", {"AutoencoderKL": AutoencoderKL}, frozen_init or init, dtype))
        encoder = {"CLIPVisionModelWithProjection": CLIPVisionModelWithProjection}
        self.image_encoder = freeze(load_part(folder, "image_encoder", encoder, frozen_init or init, dtype))
        self.processor = read_processor(folder, "feature_extractor")
        config = DDIMScheduler.load_config(folder, subfolder="scheduler")
        self.scheduler = DDIMScheduler.from_config(config)
        self.train_scheduler = DDPMScheduler.from_config(config)
        self.fps = cfg.fps or self.default_fps
        self.scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if self.unet.config.in_channels != self.vae.config.latent_channels:
            raise PandoraError(
                f"generator '{folder}': unet/config.json in_channels={self.unet.config.in_channels} but the VAE has "
                f"{self.vae.config.latent_channels} latent channels"
            )
        self.check_size(self.scale, "its VAE's downscale")

    context_key = "unet/config.json cross_attention_dim"  # where the cross-attention width is set

    def teacher(self, length: int, init: str = "weights", dtype: torch.dtype | None = None) -> PromptEncoder:
        """The CLIP text encoder the UNet was trained with; the pipeline pads to the tokenizer's length (77)."""
        classes = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
        model = load_part(self.folder, "text_encoder", classes, init, dtype)
        tokenizer = AutoTokenizer.from_pretrained(self.folder / "tokenizer")
        if length != tokenizer.model_max_length:
            raise PandoraError(
                f"output_adapter.num_queries={length} but the i2vgen-xl text encoder gives {tokenizer.model_max_length} "
                f"tokens (tokenizer model_max_length); set model.output_adapter.num_queries={tokenizer.model_max_length}"
            )
        return PromptEncoder(model, tokenizer, encode_prompt, length)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> scaled latents (B, T, 4, h, w), contiguous (the VAE gives channels-last, and noise
        drawn `like` them would then differ from noise drawn like stored latents)."""
        z = self.vae.encode(frames.flatten(0, 1).to(self.vae.dtype)).latent_dist.mode()
        return (z.float() * self.vae.config.scaling_factor).unflatten(0, frames.shape[:2]).contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.flatten(0, 1) / self.vae.config.scaling_factor
        frames = torch.cat([self.vae.decode(f[None].to(self.vae.dtype)).sample for f in z])  # frame by frame, as the pipeline
        return frames.float().unflatten(0, latents.shape[:2]).clamp(-1, 1)

    @torch.no_grad()
    def image_embedding(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 1, D) CLIP image embedding of its centre square."""
        pixels = clip_pixels(image, self.processor, square_crop=True).to(self.image_encoder.dtype)
        return self.image_encoder(pixels).image_embeds.float().unsqueeze(1)

    @torch.no_grad()
    def precompute(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, T, 3, H, W) -> what `forward` reads of its frozen parts, per frame: scaled VAE latents
        (B, T, 4, h, w) and the CLIP image embedding of each frame (B, T, 1, D) (the window's first is used)."""
        b, t = frames.shape[:2]
        return {"latents": self.encode(frames), "image_embeds": self.image_embedding(frames.flatten(0, 1)).unflatten(0, (b, t))}

    def image_latents(self, known: torch.Tensor) -> torch.Tensor:
        """Latents of the k given frames (B, k, 4, h, w) -> the image stream (B, 4, T, h, w): them, then position maps."""
        t, k = self.cfg.frames, known.shape[1]
        steps = torch.arange(1, t - k + 1, device=known.device, dtype=known.dtype) / (t - k)
        maps = steps.view(1, -1, 1, 1, 1).expand(known.shape[0], -1, *known.shape[2:])
        return torch.cat([known, maps], dim=1).transpose(1, 2)

    def unet_out(self, x, t, context, image_latents, image_embeds) -> torch.Tensor:
        """x (B, T, 4, h, w) -> model output (B, T, 4, h, w)."""
        dtype = self.unet.dtype
        fps = torch.full((x.shape[0],), self.fps, device=x.device)
        out = self.unet(
            x.transpose(1, 2).to(dtype), t, encoder_hidden_states=context.to(dtype), fps=fps,
            image_latents=image_latents.to(dtype), image_embeddings=image_embeds.to(dtype),
        ).sample
        return out.float().transpose(1, 2)

    def forward(self, frames, context, noise=None, timesteps=None, encoded=None):
        """frames (B, T, 3, H, W) -> (UNet output, target of the folder's prediction type) on the new frames.
        `encoded`: the window's `precompute` outputs instead of the frames (which may then be None)."""
        k = self.cfg.cond_frames
        if encoded is None:
            x0, image_embeds = self.encode(frames), self.image_embedding(frames[:, 0])
        else:
            x0, image_embeds = encoded["latents"].float(), encoded["image_embeds"][:, 0].float()
        noise = torch.randn_like(x0) if noise is None else noise
        if timesteps is None:
            timesteps = torch.randint(0, self.train_scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        sched = self.train_scheduler
        # the scheduler's formulas broadcast over dim 1 onwards: put time with the channels
        noisy = sched.add_noise(x0.flatten(1, 2), noise.flatten(1, 2), timesteps).view_as(x0)
        pred = self.unet_out(noisy, timesteps, context, self.image_latents(x0[:, :k]), image_embeds)
        kind = sched.config.prediction_type
        if kind == "v_prediction":
            target = sched.get_velocity(x0.flatten(1, 2), noise.flatten(1, 2), timesteps).view_as(x0)
        elif kind == "epsilon":
            target = noise
        else:
            target = x0
        return pred[:, k:], target[:, k:]

    @torch.no_grad()
    def sample(self, given, context, generator=None, uncond_context=None, image=None):
        """I2VGenXLPipeline's loop on our context. given (B, k, 3, H, W) -> (B, frames, 3, H, W)."""
        b = given.shape[0]
        device = given.device
        image = given[:, 0] if image is None else image
        image_embeds = self.image_embedding(image)
        image_latents = self.image_latents(self.encode(given))
        guide = self.guidance_scale > 1
        if guide:
            if uncond_context is None:
                raise PandoraError("generator i2vgen-xl: guidance_scale > 1 needs the empty text's context (uncond_context)")
            context = torch.cat([uncond_context, context])
            image_embeds = torch.cat([torch.zeros_like(image_embeds), image_embeds])
            image_latents = torch.cat([image_latents, image_latents])
        scheduler = self.scheduler
        scheduler.set_timesteps(self.num_inference_steps, device=device)
        h, w = given.shape[-2] // self.scale, given.shape[-1] // self.scale
        shape = (b, self.vae.config.latent_channels, self.cfg.frames, h, w)  # the pipeline draws (B, C, T, h, w)
        x = (randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) * scheduler.init_noise_sigma).transpose(1, 2)
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([x, x]) if guide else x, t)
            out = self.unet_out(inp, t, context, image_latents, image_embeds)
            if guide:
                uncond, cond = out.chunk(2)
                out = uncond + self.guidance_scale * (cond - uncond)
            x = scheduler.step(out, t, x, eta=0.0, generator=generator).prev_sample
        return self.decode(x)
