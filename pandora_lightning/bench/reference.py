"""Config-only folders of the published reference components: config.json files as the releases ship
them (no weights, no tokenizer), enough to build the whole model on the meta device and count it
(tests/test_reference.py, `plan`), or with random weights on a GPU (`bench.scale --reference`)."""
from __future__ import annotations

import json
from pathlib import Path

# lmsys/vicuna-7b-v1.5 config.json
LLM = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "pad_token_id": 0, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True,
    "vocab_size": 32000,
}
# openai/clip-vit-large-patch14 config.json (the whole CLIP model; the vision tower is read from it)
VISION = {
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768, "torch_dtype": "float32",
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                    "projection_dim": 768, "max_position_embeddings": 77, "vocab_size": 49408},
    "vision_config": {"hidden_size": 1024, "image_size": 224, "intermediate_size": 4096, "num_attention_heads": 16,
                      "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
}
PREPROCESSOR = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
    "size": 224,
}
# stabilityai/stable-video-diffusion-img2vid-xt unet/, vae/, scheduler/
UNET = {
    "_class_name": "UNetSpatioTemporalConditionModel", "addition_time_embed_dim": 256, "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 1024, "down_block_types": ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
    "in_channels": 8, "layers_per_block": 2, "num_attention_heads": [5, 10, 20, 20], "num_frames": 25, "out_channels": 4,
    "projection_class_embeddings_input_dim": 768, "sample_size": 96, "transformer_layers_per_block": 1,
    "up_block_types": ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
}
VAE = {
    "_class_name": "AutoencoderKLTemporalDecoder", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "out_channels": 3, "sample_size": 768, "scaling_factor": 0.18215,
}
SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "set_alpha_to_one": False, "sigma_max": 700.0, "sigma_min": 0.002, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "timestep_type": "continuous", "trained_betas": None, "use_karras_sigmas": True,
}
# OpenCLIP ViT-H/14's text tower (DynamiCrafter's text encoder) as a transformers CLIPTextModel
TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "gelu", "hidden_size": 1024,
    "intermediate_size": 4096, "max_position_embeddings": 77, "num_attention_heads": 16, "num_hidden_layers": 24,
    "projection_dim": 1024, "vocab_size": 49408, "torch_dtype": "float16",
}
# Parameter counts published for the reference (millions)
PUBLISHED = {"vision.tower": 303, "llm.model": 6740, "input_adapter": 21, "output_adapter": 103, "generator.unet": 1520,
             "generator.vae": 98, "text_encoder.model": 353}
PUBLISHED_TOTAL = 9100


def write_reference_folders(root: Path, tokenizer_words: list[str] | None = None) -> dict[str, Path]:
    """The four folders recipes/pandora-7b names, under `root`. `tokenizer_words`: also save a word-level
    tokenizer of these words into the LLM and text-encoder folders (a config-only folder has none;
    a random-weights build needs one to tokenize)."""

    def dump(path: Path, content: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2))

    dump(root / "vicuna-7b" / "config.json", LLM)
    dump(root / "clip-vit-large-patch14" / "config.json", VISION)
    dump(root / "clip-vit-large-patch14" / "preprocessor_config.json", PREPROCESSOR)
    dump(root / "video" / "unet" / "config.json", UNET)
    dump(root / "video" / "vae" / "config.json", VAE)
    dump(root / "video" / "scheduler" / "scheduler_config.json", SCHEDULER)
    dump(root / "video" / "text_encoder" / "config.json", TEXT_ENCODER)
    if tokenizer_words:
        from pandora_lightning.models.tokenizer import build_word_tokenizer

        for folder in (root / "vicuna-7b", root / "video" / "text_encoder"):
            build_word_tokenizer(tokenizer_words).save_pretrained(folder)
    return {"llm": root / "vicuna-7b", "vision": root / "clip-vit-large-patch14", "generator": root / "video",
            "text_encoder": root / "video" / "text_encoder"}
