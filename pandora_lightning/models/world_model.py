"""WorldModel: vision encoder -> input adapter -> LLM (+ query tokens) -> output adapter -> video generator."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from pandora_lightning.models.generator import GeneratorConfig, VideoGenerator
from pandora_lightning.models.input_adapter import InputAdapter, InputAdapterConfig
from pandora_lightning.models.llm import LLMBackbone, LLMConfig
from pandora_lightning.models.output_adapter import OutputAdapter, OutputAdapterConfig
from pandora_lightning.models.text_encoder import TextEncoder, TextEncoderConfig
from pandora_lightning.models.vision_encoder import VisionEncoder, VisionEncoderConfig


@dataclass
class WorldModelConfig:
    vision: VisionEncoderConfig = field(default_factory=VisionEncoderConfig)
    input_adapter: InputAdapterConfig = field(default_factory=InputAdapterConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    output_adapter: OutputAdapterConfig = field(default_factory=OutputAdapterConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)


class WorldModel(nn.Module):
    """Composes the components; owns no training logic. Frames are (B, T, 3, H, W) in [-1, 1]."""

    def __init__(self, cfg: WorldModelConfig, vocabulary: Iterable[str] = ()):
        """`vocabulary`: the words of the tiny word-level tokenizers (used only by components built
        without a pretrained folder, which bring their own tokenizer)."""
        super().__init__()
        self.cfg = cfg
        self.vocabulary = list(vocabulary)
        self.vision = VisionEncoder(cfg.vision)
        self.llm = LLMBackbone(cfg.llm, self.vocabulary)
        self.input_adapter = InputAdapter(cfg.input_adapter, self.vision.hidden_size, self.llm.hidden_size)
        self.generator = VideoGenerator(cfg.generator)
        self.output_adapter = OutputAdapter(cfg.output_adapter, self.llm.hidden_size, self.generator.context_dim)
        self.text_encoder = None
        if cfg.text_encoder.enabled:
            self.text_encoder = TextEncoder(
                cfg.text_encoder, cfg.output_adapter.num_queries, self.generator.context_dim, self.vocabulary
            )

    @property
    def cond_frames(self) -> int:
        return self.cfg.generator.cond_frames

    @property
    def new_frames(self) -> int:
        return self.cfg.generator.frames - self.cfg.generator.cond_frames

    def forward(self, given: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """given (B, Tc, 3, H, W) + B texts -> generator context (B, N, Dctx): vision encoder ->
        input adapter -> LLM -> output adapter. The generator's denoiser is its own `forward`."""
        b, t = given.shape[:2]
        patches = self.vision(given.flatten(0, 1))
        state = self.input_adapter(patches.unflatten(0, (b, t)))
        return self.output_adapter(self.llm(state, texts))

    def context(self, given: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """The generator context that the LLM path gives for `texts` (see `forward`)."""
        return self(given, texts)

    def teacher_context(self, texts: list[str]) -> torch.Tensor:
        """B texts -> (B, N, Dctx): the generator's own text embedding, which `context` learns to imitate."""
        if self.text_encoder is None:
            raise ValueError("this model has no text encoder; set model.text_encoder.enabled=true")
        return self.text_encoder(texts)
