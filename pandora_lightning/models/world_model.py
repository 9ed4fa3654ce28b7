"""WorldModel: vision encoder -> input adapter -> LLM (+ query tokens) -> output adapter -> video generator."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from pandora_lightning.errors import PandoraError
from pandora_lightning.models.generator import GeneratorConfig, build_generator
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
        self.generator = build_generator(cfg.generator)
        self._check_context(cfg)
        self.output_adapter = OutputAdapter(cfg.output_adapter, self.llm.hidden_size, self.generator.context_dim)
        self.text_encoder = None
        if cfg.text_encoder.enabled:
            self.text_encoder = self._teacher(cfg)

    def _check_context(self, cfg: WorldModelConfig) -> None:
        """The output adapter must produce what the generator's cross-attention takes."""
        gen, adapter = self.generator, cfg.output_adapter
        if adapter.context_dim is not None and adapter.context_dim != gen.context_dim:
            raise PandoraError(
                f"output_adapter.context_dim={adapter.context_dim} but the {gen.family} generator's cross-attention takes "
                f"{gen.context_dim}-wide context ({gen.context_key}); set model.output_adapter.context_dim={gen.context_dim} "
                f"or leave it null to follow the generator"
            )
        if gen.context_tokens is not None and adapter.num_queries != gen.context_tokens:
            raise PandoraError(
                f"output_adapter.num_queries={adapter.num_queries} but the {gen.family} generator takes exactly "
                f"{gen.context_tokens} context tokens; set model.output_adapter.num_queries={gen.context_tokens}"
            )

    def _teacher(self, cfg: WorldModelConfig):
        """The generator's own text encoder: from text_encoder.pretrained, else the generator's folder, else tiny."""
        gen, tokens = self.generator, cfg.output_adapter.num_queries
        if cfg.text_encoder.pretrained or gen.family == "tiny":
            return TextEncoder(cfg.text_encoder, tokens, gen.context_dim, self.vocabulary)
        if not gen.has_text_teacher:
            raise PandoraError(
                f"generator family {gen.family} has no text encoder to distill from (its cross-attention took a CLIP "
                f"image embedding): set model.text_encoder.enabled=false, loss.distill_weight=0 and loss.context=adapter "
                f"(the align stage then trains with the diffusion loss alone)"
            )
        teacher = gen.teacher(tokens)
        if teacher.width != gen.context_dim:
            raise PandoraError(
                f"generator '{cfg.generator.pretrained}': text_encoder/ gives {teacher.width}-wide embeddings but the "
                f"cross-attention takes {gen.context_dim} ({gen.context_key})"
            )
        return teacher

    @property
    def cond_frames(self) -> int:
        return self.cfg.generator.cond_frames

    @property
    def new_frames(self) -> int:
        return self.cfg.generator.frames - self.cfg.generator.cond_frames

    def forward(self, given: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """given (B, Tc, 3, H, W) + B texts -> generator context (B, N, Dctx): vision encoder ->
        input adapter -> LLM -> output adapter. The generator's `forward` is its training pair (prediction, target)."""
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
            raise PandoraError("this model has no text encoder; set model.text_encoder.enabled=true")
        return self.text_encoder(texts)
