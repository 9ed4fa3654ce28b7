"""Wan 2.1 / 2.2: WanTransformer3DModel + AutoencoderKLWan, flow matching, UMT5 text encoder (the teacher).

Latents are the causal video VAE's, normalised with its latents_mean / latents_std; time is
compressed 4x with the first frame on its own, so a clip has 1 + 4m frames and the given frames
1 + 4j (their latents are exactly the first 1 + j latent frames). The output adapter's tokens take
the place of the UMT5 prompt embedding (text_dim wide; 512 tokens when the model has an image stream).

The given frames condition as the folder's transformer expects:
- image-to-video transformers (in_channels = 2 x 16 + 4, Wan2.1-I2V): WanImageToVideoPipeline's
  channel concatenation of [4 mask channels, latents of the given frames followed by zero frames],
  plus the CLIP image embedding of the start image when the transformer has an image stream;
- text-to-video transformers (in_channels = 16: Wan2.1-T2V, Wan2.2-TI2V): the given latent frames
  replace the noisy ones and get timestep 0 (per-token timesteps), as WanImageToVideoPipeline with
  expand_timesteps does for Wan2.2-TI2V.

Training: x_s = (1 - s) x0 + s noise with s drawn uniformly and shifted by the scheduler's
flow_shift, the transformer at timestep 1000 s, target noise - x0 (flow matching). Sampling: the
folder's scheduler (UniPC with flow sigmas in the releases), 50 steps, guidance 5.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanTransformer3DModel
from diffusers.utils.torch_utils import randn_tensor
from transformers import AutoTokenizer, CLIPVisionModel, CLIPVisionModelWithProjection, UMT5EncoderModel

from pandora_lightning.errors import PandoraError
from pandora_lightning.models.generators.base import FamilyGenerator, PromptEncoder, clip_pixels, freeze, load_part, read_model_index, read_processor

# peft target modules (module-name suffixes) for LoRA on the transformer: self- and cross-attention
# projections of every block (+ the image stream's added key/value when present) and the feed-forward.
LORA_ATTENTION_MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
LORA_IMAGE_MODULES = ("attn2.add_k_proj", "attn2.add_v_proj")
LORA_FFN_MODULES = ("ffn.net.0.proj", "ffn.net.2")
TEXT_TOKENS = 512  # the I2V transformer splits its context as [image tokens, last 512 = text]

_SCHEDULERS = {"UniPCMultistepScheduler": UniPCMultistepScheduler, "FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler}


def encode_prompt(model, tokenizer, texts: list[str], length: int) -> torch.Tensor:
    """WanPipeline._get_t5_prompt_embeds: UMT5's last hidden state, zero after each text's own tokens."""
    enc = tokenizer(texts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True, return_tensors="pt")
    mask = enc.attention_mask.to(model.device)
    hidden = model(enc.input_ids.to(model.device), mask).last_hidden_state
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)


class WanGenerator(FamilyGenerator):
    family = "wan"
    default_steps = 50
    default_guidance = 5.0
    precompute_refusal = ("its causal video VAE encodes a window from the window's first frame, so latents cannot be "
                          "stored once per frame")

    def __init__(self, cfg, folder: Path, init: str = "weights", dtype: torch.dtype | None = None, frozen_init: str | None = None):
        super().__init__(cfg, folder)
        self.transformer = load_part(folder, "transformer", {"WanTransformer3DModel": WanTransformer3DModel}, init, dtype)
        self.vae = freeze(load_part(folder, "vae", {"AutoencoderKLWan": AutoencoderKLWan}, init, dtype))
        z = self.vae.config.z_dim
        inputs = self.transformer.config.in_channels
        if inputs not in (z, 2 * z + 4):
            raise PandoraError(
                f"generator '{folder}': transformer/config.json in_channels={inputs}; with a {z}-channel VAE it must be "
                f"{z} (text-to-video, Wan2.2-TI2V) or {2 * z + 4} (image-to-video)"
            )
        self.concat = inputs == 2 * z + 4
        self.image_encoder = None
        if self.transformer.config.image_dim is not None:
            classes = {"CLIPVisionModel": CLIPVisionModel, "CLIPVisionModelWithProjection": CLIPVisionModelWithProjection}
            self.image_encoder = freeze(load_part(folder, "image_encoder", classes, init, dtype))
            self.processor = read_processor(folder, "image_processor")
        config = UniPCMultistepScheduler.load_config(folder, subfolder="scheduler")
        name = config.get("_class_name")
        if name not in _SCHEDULERS:
            raise PandoraError(f"generator '{folder}': scheduler {name}; the wan family samples with {' or '.join(_SCHEDULERS)}")
        self.scheduler = _SCHEDULERS[name].from_config(config)
        self.shift = config.get("flow_shift") or config.get("shift") or 1.0
        self.expand_timesteps = bool(read_model_index(folder).get("expand_timesteps", False))
        self.t_scale = self.vae.config.scale_factor_temporal
        self.scale = self.vae.config.scale_factor_spatial
        if (cfg.frames - 1) % self.t_scale or (cfg.cond_frames - 1) % self.t_scale:
            raise PandoraError(
                f"generator family wan compresses time {self.t_scale}x after the first frame: generator.frames and "
                f"generator.cond_frames must be 1 + {self.t_scale}k (e.g. 81 and 1, or 9 and 5); got {cfg.frames} and {cfg.cond_frames}"
            )
        self.check_size(self.scale * self.transformer.config.patch_size[1], "VAE downscale x patch size")
        mean = torch.tensor(self.vae.config.latents_mean).view(1, z, 1, 1, 1)
        std = torch.tensor(self.vae.config.latents_std).view(1, z, 1, 1, 1)
        self.register_buffer("latents_mean", mean, persistent=False)
        self.register_buffer("latents_std", std, persistent=False)

    context_key = "transformer/config.json text_dim"  # where the cross-attention width is set

    @property
    def backbone(self):
        """The denoiser: what trains (generator.transformer.*) and takes LoRA; VAE and encoders stay frozen."""
        return self.transformer

    @property
    def context_dim(self) -> int:
        return self.transformer.config.text_dim

    @property
    def context_tokens(self) -> int | None:
        return TEXT_TOKENS if self.image_encoder is not None else None

    @property
    def cond_latent_frames(self) -> int:
        return (self.cfg.cond_frames - 1) // self.t_scale + 1

    def teacher(self, length: int, init: str = "weights", dtype: torch.dtype | None = None) -> PromptEncoder:
        """The UMT5 encoder the transformer was trained with; `length` tokens (the pipeline's max_sequence_length, 512)."""
        model = load_part(self.folder, "text_encoder", {"UMT5EncoderModel": UMT5EncoderModel}, init, dtype)
        return PromptEncoder(model, AutoTokenizer.from_pretrained(self.folder / "tokenizer"), encode_prompt, length)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> normalised latents (B, 16, 1 + (T - 1) / 4, h, w)."""
        z = self.vae.encode(frames.transpose(1, 2).to(self.vae.dtype)).latent_dist.mode().float()
        return (z - self.latents_mean) / self.latents_std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents * self.latents_std + self.latents_mean
        video = self.vae.decode(z.to(self.vae.dtype)).sample
        return video.float().transpose(1, 2).clamp(-1, 1)

    @torch.no_grad()
    def image_embedding(self, image: torch.Tensor) -> torch.Tensor | None:
        """(B, 3, H, W) -> the image stream's tokens (penultimate CLIP layer), or None without one."""
        if self.image_encoder is None:
            return None
        pixels = clip_pixels(image, self.processor, square_crop=False).to(self.image_encoder.dtype)
        return self.image_encoder(pixels, output_hidden_states=True).hidden_states[-2].float()

    @torch.no_grad()
    def condition(self, given: torch.Tensor) -> torch.Tensor:
        """given (B, k, 3, H, W) -> what the transformer sees of them (see the module docstring)."""
        if not self.concat:
            return self.encode(given)
        b, k, _, height, width = given.shape
        video = torch.cat([given, given.new_zeros(b, self.cfg.frames - k, 3, height, width)], dim=1)
        latents = self.encode(video)
        mask = torch.zeros(b, self.cfg.frames + self.t_scale - 1, *latents.shape[-2:], device=given.device)
        mask[:, : k + self.t_scale - 1] = 1  # the first frame counts t_scale times, as in the pipeline
        mask = mask.view(b, -1, self.t_scale, *latents.shape[-2:]).transpose(1, 2)
        return torch.cat([mask, latents], dim=1)

    def model_out(self, x, t, cond, context, image_embeds) -> torch.Tensor:
        """x (B, 16, F, h, w) noisy latents, t scalar or (B,) timestep -> (velocity, the input actually used)."""
        n = self.cond_latent_frames
        b = x.shape[0]
        if self.concat:
            inp, timestep = torch.cat([x, cond], dim=1), t.expand(b) if t.dim() == 0 else t
        else:
            inp = torch.cat([cond[:, :, :n], x[:, :, n:]], dim=2)
            p = self.transformer.config.patch_size
            tokens = torch.ones(x.shape[2], x.shape[3] // p[1], x.shape[4] // p[2], device=x.device)
            tokens[:n] = 0
            timestep = (tokens.flatten()[None] * (t.view(-1, 1) if t.dim() else t)).expand(b, -1)
        dtype = self.transformer.dtype
        out = self.transformer(
            hidden_states=inp.to(dtype), timestep=timestep, encoder_hidden_states=context.to(dtype),
            encoder_hidden_states_image=None if image_embeds is None else image_embeds.to(dtype),
        ).sample
        return out.float()

    def draw_sigma(self, batch: int, device, generator=None) -> torch.Tensor:
        u = torch.rand(batch, device=device, generator=generator)
        return self.shift * u / (1 + (self.shift - 1) * u)

    def forward(self, frames, context, noise=None, sigma=None):
        """frames (B, T, 3, H, W) -> (velocity prediction, noise - x0) on the new latent frames, (B, 16, F - n, h, w)."""
        k, n = self.cfg.cond_frames, self.cond_latent_frames
        x0 = self.encode(frames)
        cond = self.condition(frames[:, :k])
        image_embeds = self.image_embedding(frames[:, 0])
        noise = torch.randn_like(x0) if noise is None else noise
        sigma = self.draw_sigma(x0.shape[0], x0.device) if sigma is None else sigma
        s = sigma.view(-1, 1, 1, 1, 1)
        pred = self.model_out((1 - s) * x0 + s * noise, sigma * self.scheduler.config.num_train_timesteps, cond, context, image_embeds)
        return pred[:, :, n:], (noise - x0)[:, :, n:]

    @torch.no_grad()
    def sample(self, given, context, generator=None, uncond_context=None, image=None):
        """WanImageToVideoPipeline's loop on our context. given (B, k, 3, H, W) -> (B, frames, 3, H, W)."""
        b, n = given.shape[0], self.cond_latent_frames
        device = given.device
        image_embeds = self.image_embedding(given[:, 0] if image is None else image)
        cond = self.condition(given)
        scheduler = self.scheduler
        scheduler.set_timesteps(self.num_inference_steps, device=device)
        frames = (self.cfg.frames - 1) // self.t_scale + 1
        shape = (b, self.vae.config.z_dim, frames, given.shape[-2] // self.scale, given.shape[-1] // self.scale)
        x = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        guide = self.guidance_scale > 1
        if guide and uncond_context is None:
            raise PandoraError("generator wan: guidance_scale > 1 needs the empty text's context (uncond_context)")
        for t in scheduler.timesteps:
            out = self.model_out(x, t, cond, context, image_embeds)
            if guide:
                uncond = self.model_out(x, t, cond, uncond_context, image_embeds)
                out = uncond + self.guidance_scale * (out - uncond)
            x = scheduler.step(out, t, x, return_dict=False)[0]
        if not self.concat:
            x = torch.cat([cond[:, :, :n], x[:, :, n:]], dim=2)
        return self.decode(x)
