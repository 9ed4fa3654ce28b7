"""Tiny random generators saved in each family's published folder layout, and the published configurations.

The folders are written the way the releases were: the family's diffusers pipeline object built
from its components and saved with save_pretrained (model_index.json, one subfolder per component,
the release's config keys at small sizes; component sizes copied from diffusers' own pipeline
tests), in fp16. Tokenizers are built in code from a word list (no downloads).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLTemporalDecoder,
    AutoencoderKLWan,
    DDIMScheduler,
    EulerDiscreteScheduler,
    I2VGenXLPipeline,
    I2VGenXLUNet,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

from pandora_lightning.models.tokenizer import word_clip_tokenizer

WORDS = ("move", "left", "right", "up", "down", "grow", "shrink", "the", "object", "a")
CONTEXT = 32  # cross-attention width of every tiny family (1024 / 1024 / 4096 in the releases)


def clip_tokenizer(max_length: int) -> CLIPTokenizer:
    """A byte-pair CLIP tokenizer whose merges spell exactly WORDS."""
    return word_clip_tokenizer(WORDS, max_length)


def t5_tokenizer() -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _clip_vision(cls, projection: int):
    return cls(CLIPVisionConfig(hidden_size=32, projection_dim=projection, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, intermediate_size=37, patch_size=8))


def _publish(pipe, folder: Path, renames: dict[str, list[str]]) -> Path:
    """save_pretrained in fp16; model_index.json names the classes the releases name (this venv has no torchvision)."""
    pipe.to(torch.float16).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update({k: v for k, v in renames.items() if k in index})
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def i2vgen_xl(folder: Path, tokens: int = 16) -> Path:
    torch.manual_seed(0)
    unet = I2VGenXLUNet(block_out_channels=(32, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
                        cross_attention_dim=CONTEXT, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32)
    # the release's scheduler config keys: v-prediction with zero terminal SNR
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
                              steps_offset=1, timestep_spacing="leading")
    tokenizer = clip_tokenizer(tokens)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=CONTEXT, intermediate_size=37, num_attention_heads=2, num_hidden_layers=2,
                                                vocab_size=len(tokenizer), max_position_embeddings=tokens, projection_dim=CONTEXT,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    pipe = I2VGenXLPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, image_encoder=_clip_vision(CLIPVisionModelWithProjection, CONTEXT),
                            feature_extractor=CLIPImageProcessor(crop_size=32, size=32), unet=unet, scheduler=scheduler)
    return _publish(pipe, folder, {"feature_extractor": ["transformers", "CLIPImageProcessor"]})


def svd(folder: Path) -> Path:
    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=CONTEXT, num_attention_heads=(2, 4), projection_class_embeddings_input_dim=24, addition_time_embed_dim=8, num_frames=6)
    vae = AutoencoderKLTemporalDecoder(block_out_channels=[32, 32], in_channels=3, out_channels=3,
                                       down_block_types=["DownEncoderBlock2D"] * 2, latent_channels=4)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
                                       num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
                                       steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)
    pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=_clip_vision(CLIPVisionModelWithProjection, CONTEXT), unet=unet,
                                        scheduler=scheduler, feature_extractor=CLIPImageProcessor(crop_size=32, size=32))
    return _publish(pipe, folder, {"feature_extractor": ["transformers", "CLIPImageProcessor"]})


def wan(folder: Path, image_to_video: bool = False) -> Path:
    """Wan2.1-T2V-1.3B's layout (WanPipeline), or Wan2.1-I2V's (WanImageToVideoPipeline, 36 input channels, image stream)."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0)
    tokenizer = t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=CONTEXT, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                               relative_attention_num_buckets=8))
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36 if image_to_video else 16, out_channels=16,
        text_dim=CONTEXT, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, image_dim=32 if image_to_video else None, added_kv_proj_dim=24 if image_to_video else None)
    renames = {"tokenizer": ["transformers", "T5TokenizerFast"]}
    if not image_to_video:
        return _publish(WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer), folder, renames)
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer,
                                   image_encoder=_clip_vision(CLIPVisionModel, 32), image_processor=CLIPImageProcessor(crop_size=32, size=32))
    return _publish(pipe, folder, {**renames, "image_processor": ["transformers", "CLIPImageProcessor"]})


# --- the released configurations, written config-only (no weights) -------------------------------------
# Sizes from the releases' config.json files (i2vgen-xl and SVD-xt: the diffusers classes' defaults,
# which are those releases; Wan2.1-T2V-1.3B: diffusers' scripts/convert_wan_to_diffusers.py).
CLIP_H_VISION = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32, patch_size=14,
                     image_size=224, projection_dim=1024, hidden_act="gelu")
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4, layers_per_block=2, latent_channels=4)
WAN_1_3B = dict(added_kv_proj_dim=None, attention_head_dim=128, cross_attn_norm=True, eps=1e-06, ffn_dim=8960, freq_dim=256,
                in_channels=16, num_attention_heads=12, num_layers=30, out_channels=16, patch_size=[1, 2, 2],
                qk_norm="rms_norm_across_heads", text_dim=4096)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
# Published sizes (parameters) of the parts, where the release or its paper states one.
PUBLISHED = {
    "svd": {"unet": 1.52e9, "vae": 98e6},  # SVD paper (1.52B video UNet); the project brief (98 M VAE)
    "wan": {"transformer": 1.3e9, "vae": 127e6},  # Wan2.1 report: "1.3B" (its name), Wan-VAE 127M
    "i2vgen-xl": {},  # the report gives 3.7B for both stages together, no per-part figure
}


def _save(model, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model.config, "save_pretrained"):  # transformers: its class goes in "architectures", as save_pretrained writes it
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(folder)
    else:
        model.save_config(folder)


def published(family: str, folder: Path) -> Path:
    """A config-only folder of the family's released model: model_index.json + every part's config, no weights."""
    from transformers import CLIPVisionConfig as VC

    folder.mkdir(parents=True, exist_ok=True)
    schedulers = {
        "i2vgen-xl": lambda: DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                           prediction_type="v_prediction", rescale_betas_zero_snr=True, steps_offset=1, timestep_spacing="leading"),
        "svd": lambda: EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
                                              prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
                                              timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True),
        "wan": lambda: UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0),
    }
    scheduler = schedulers[family]()
    with torch.device("meta"):
        if family == "i2vgen-xl":
            parts = {
                "unet": I2VGenXLUNet(),
                "vae": AutoencoderKL(**SD_VAE, up_block_types=["UpDecoderBlock2D"] * 4, sample_size=768),
                "text_encoder": CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                                             num_hidden_layers=24, projection_dim=1024, hidden_act="gelu")),
                "image_encoder": CLIPVisionModelWithProjection(VC(**CLIP_H_VISION)),
            }
            extra = {"tokenizer": clip_tokenizer(77), "feature_extractor": CLIPImageProcessor()}
            pipeline = "I2VGenXLPipeline"
        elif family == "svd":
            parts = {"unet": UNetSpatioTemporalConditionModel(), "vae": AutoencoderKLTemporalDecoder(**SD_VAE),
                     "image_encoder": CLIPVisionModelWithProjection(VC(**CLIP_H_VISION))}
            extra = {"feature_extractor": CLIPImageProcessor()}
            pipeline = "StableVideoDiffusionPipeline"
        else:
            parts = {"transformer": WanTransformer3DModel(**WAN_1_3B), "vae": AutoencoderKLWan(),
                     "text_encoder": UMT5EncoderModel(UMT5Config(**UMT5_XXL))}
            extra = {"tokenizer": t5_tokenizer()}
            pipeline = "WanPipeline"
    for name, model in parts.items():
        _save(model, folder / name)
    scheduler.save_config(folder / "scheduler")
    for name, obj in extra.items():
        obj.save_pretrained(folder / name)
    index = {"_class_name": pipeline, "scheduler": ["diffusers", type(scheduler).__name__]}
    index.update({n: ["diffusers" if n in ("unet", "vae", "transformer") else "transformers", type(m).__name__] for n, m in parts.items()})
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
