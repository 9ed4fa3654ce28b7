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

    def __init__(self, cfg: WorldModelConfig, tiny_corpus: Iterable[str] = ()):
        super().__init__()
        self.cfg = cfg
        tiny_corpus = list(tiny_corpus)
        self.vision = VisionEncoder(cfg.vision)
        self.llm = LLMBackbone(cfg.llm, tiny_corpus)
        self.input_adapter = InputAdapter(cfg.input_adapter, self.vision.hidden_size, self.llm.hidden_size)
        self.generator = VideoGenerator(cfg.generator)
        self.output_adapter = OutputAdapter(cfg.output_adapter, self.llm.hidden_size, self.generator.context_dim)
        self.text_encoder = None
        if cfg.text_encoder.enabled:
            self.text_encoder = TextEncoder(
                cfg.text_encoder, cfg.output_adapter.num_queries, self.generator.context_dim, tiny_corpus
            )

    @property
    def cond_frames(self) -> int:
        return self.cfg.generator.cond_frames

    @property
    def new_frames(self) -> int:
        return self.cfg.generator.frames - self.cfg.generator.cond_frames

    def context(self, given: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """given (B, Tc, 3, H, W) + B texts -> generator context (B, N, Dctx)."""
        b, t = given.shape[:2]
        patches = self.vision(given.flatten(0, 1))
        state = self.input_adapter(patches.unflatten(0, (b, t)))
        return self.output_adapter(self.llm(state, texts))

    def teacher_context(self, texts: list[str]) -> torch.Tensor:
        """B texts -> (B, N, Dctx): the generator's own text embedding, which `context` learns to imitate."""
        if self.text_encoder is None:
            raise ValueError("this model has no text encoder; set model.text_encoder.enabled=true")
        return self.text_encoder(texts)

    @torch.no_grad()
    def rollout(self, start: torch.Tensor, actions: list[list[str]], seed: int = 0) -> torch.Tensor:
        """Generate round after round, one action per round; the action may change every round.

        start (B, 3, H, W); actions[r][b] is sample b's action in round r.
        Returns (B, Tc + R * F, 3, H, W): the start frame repeated Tc times, then the F new
        frames of each round. Round r > 1 is conditioned on the last Tc frames so far.
        """
        if not actions or any(len(a) != start.shape[0] for a in actions):
            raise ValueError(
                f"rollout needs one list of {start.shape[0]} action texts per round; got {[len(a) for a in actions]} "
                f"(an empty action list generates nothing)"
            )
        # Sample b draws its noise from seed + b: a rollout does not depend on the batch it ran in.
        rng = [torch.Generator().manual_seed(seed + b) for b in range(start.shape[0])]
        video = start.unsqueeze(1).expand(-1, self.cond_frames, -1, -1, -1)
        for texts in actions:
            given = video[:, -self.cond_frames :]
            uncond = None
            if self.cfg.generator.guidance_scale == 1.0:
                context = self.context(given, texts)
            else:  # the text and the empty text through the encoders in one batch
                context, uncond = self.context(torch.cat([given, given]), [*texts, *[""] * len(texts)]).chunk(2)
            clip = self.generator.sample(given, context, generator=rng, uncond_context=uncond)
            video = torch.cat([video, clip[:, self.cond_frames :]], dim=1)
        return video
