"""Text encoder: the video generator's own text conditioning, the teacher the output adapter imitates.

A text-to-video generator was trained with a text encoder (CLIP-style: 77 tokens x 1024 in the
reference). Pandora replaces that embedding with the output adapter's answer, and the align stage
teaches the adapter to produce it: its distillation loss pulls the adapter output towards this
encoder's embedding of the same text. The embedding is the encoder's last hidden state padded to
a fixed number of tokens, the output adapter's query count.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from pandora_lightning.errors import PandoraError
from pandora_lightning.models.loading import LoadOptions, build_empty, check_weights, load_tokenizer, local_dir, read_config
from pandora_lightning.models.tokenizer import build_word_tokenizer


@dataclass
class TextEncoderConfig:
    enabled: bool = False  # off: no teacher (the distillation loss and loss.context=teacher need it)
    # Local transformers CLIPTextModel dir holding its tokenizer too (a diffusers pipeline's
    # text_encoder/ with the tokenizer files copied in); null = tiny random CLIP text model.
    pretrained: str | None = None
    num_layers: int = 1
    num_heads: int = 4
    intermediate_size: int = 128
    # Weight init scale of the tiny encoder (CLIP's initializer_factor). A frozen random teacher
    # must give texts clearly different embeddings; at 1.0 the six world actions already differ
    # in about two thirds of the embedding variance.
    initializer_factor: float = 1.0


class TextEncoder(nn.Module):
    """B texts -> (B, N, D): last hidden states of the text padded or truncated to N tokens."""

    def __init__(
        self, cfg: TextEncoderConfig, num_tokens: int, width: int, vocabulary: Iterable[str] = (), load: LoadOptions = LoadOptions()
    ):
        super().__init__()
        self.num_tokens = num_tokens
        self.pretrained: dict[str, str] = {}  # submodule -> the folder its weights were read from
        if cfg.pretrained:
            folder = local_dir(cfg.pretrained, "text_encoder")
            model_type = read_config(folder).get("model_type", "?")
            if model_type not in ("clip_text_model", "clip"):
                raise PandoraError(
                    f"text_encoder: '{folder}' holds a '{model_type}' model; expected a CLIP text model "
                    f"(model_type clip_text_model, or a whole clip model)"
                )
            self.tokenizer = load_tokenizer(folder, "text_encoder", load)
            if check_weights(folder, "text_encoder", load):
                if load.lazy:  # the weights are read later, each rank its own shard
                    config = CLIPTextConfig.from_pretrained(folder)
                    self.model = build_empty(lambda: CLIPTextModel._from_config(config, dtype=load.dtype))
                else:
                    self.model = CLIPTextModel.from_pretrained(folder, dtype=load.dtype)
                self.pretrained["model"] = cfg.pretrained
            else:
                with load.device():
                    self.model = CLIPTextModel(CLIPTextConfig.from_pretrained(folder))
        else:
            self.tokenizer = build_word_tokenizer(vocabulary)
            with load.device():
                self.model = CLIPTextModel(
                    CLIPTextConfig(
                        vocab_size=len(self.tokenizer),
                        hidden_size=width,
                        intermediate_size=cfg.intermediate_size,
                        num_hidden_layers=cfg.num_layers,
                        num_attention_heads=cfg.num_heads,
                        max_position_embeddings=num_tokens,
                        pad_token_id=self.tokenizer.pad_token_id,
                        bos_token_id=self.tokenizer.bos_token_id,
                        eos_token_id=self.tokenizer.pad_token_id,
                        initializer_factor=cfg.initializer_factor,
                    )
                )
        if self.model.config.hidden_size != width:
            raise PandoraError(
                f"text_encoder '{cfg.pretrained}' gives {self.model.config.hidden_size}-wide embeddings but the "
                f"generator's cross-attention takes {width}; use the text encoder the generator was trained with"
            )
        if self.model.config.max_position_embeddings < num_tokens:
            raise PandoraError(
                f"text_encoder takes at most {self.model.config.max_position_embeddings} tokens but "
                f"output_adapter.num_queries={num_tokens}; set num_queries to at most that"
            )

    def forward(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        if self.tokenizer is None:  # a config-only folder on the meta device (a plan)
            ids = torch.zeros(len(texts), self.num_tokens, dtype=torch.long, device=device)
            return self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.num_tokens, return_tensors="pt")
        out = self.model(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device))
        return out.last_hidden_state
