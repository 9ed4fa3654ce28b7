"""Tiny random components written the way real releases are: save_pretrained folders, in fp16, with
the tokenizer and image processor files, and the diffusers layout (unet/, vae/, scheduler/)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from pandora_lightning.models.tokenizer import build_word_tokenizer
from pandora_lightning.world.vocabulary import world_vocabulary
from tests.generator_folders import CONTEXT, svd  # CONTEXT: the UNet's cross-attention width = the text encoder's


def save_folders(root: Path, dtype: torch.dtype = torch.float16, generator: bool = True) -> dict[str, Path]:
    """vision (CLIP, 336-style processor), llm (Llama + tokenizer), text_encoder (CLIP text + tokenizer),
    in `dtype`; video: the svd family's folder (float32)."""
    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(world_vocabulary())
    CLIPVisionModel(
        CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, projection_dim=16)
    ).to(dtype).save_pretrained(root / "vision")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "vision")
    LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id, max_position_embeddings=128)
    ).to(dtype).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=CONTEXT, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id)
    ).to(dtype).save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "text_encoder")
    folders = {name: root / name for name in ("vision", "llm", "text_encoder")}
    if generator:  # the svd family's published layout (model_index.json, unet/, vae/, image_encoder/, scheduler/)
        folders["video"] = svd(root / "video")
    return folders


def folder_overrides(folders: dict[str, Path]) -> list[str]:
    """Recipe overrides that build every component from `folders`."""
    out = [
        f"model.vision.pretrained={folders['vision']}",
        f"model.llm.pretrained={folders['llm']}",
        "model.text_encoder.enabled=true",
        f"model.text_encoder.pretrained={folders['text_encoder']}",
        "model.output_adapter.num_queries=16",
    ]
    if "video" in folders:
        out.append(f"model.generator.pretrained={folders['video']}")
    else:
        out.append(f"model.generator.cross_attention_dim={CONTEXT}")
    return out
