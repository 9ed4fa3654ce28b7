"""WorldModel: vision encoder -> input adapter -> LLM (+ query tokens) -> output adapter -> video generator."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from pandora_lightning.errors import PandoraError
from pandora_lightning.models.generator import GeneratorConfig, build_generator
from pandora_lightning.models.history import RoundCache, trim
from pandora_lightning.models.input_adapter import InputAdapter, InputAdapterConfig
from pandora_lightning.models.llm import LLMBackbone, LLMConfig
from pandora_lightning.models.loading import LoadOptions
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
    # pretrained: every `pretrained` folder must hold weights; random: folders may hold only their
    # config and every component gets random weights (to plan and benchmark a real-size model).
    weights: str = "pretrained"

    def __post_init__(self):
        if self.weights not in ("pretrained", "random"):
            raise PandoraError(f"model.weights='{self.weights}' is unknown; use pretrained or random")


def generator_parts(generator: nn.Module, folder: str | None, load: LoadOptions) -> dict[str, str]:
    """A family generator's parts read from its diffusers folder: each child saved in a subfolder of its name."""
    if not folder or not load.read_weights:
        return {}
    root = Path(folder).expanduser()
    return {name: str(root / name) for name, _ in generator.named_children() if (root / name / "config.json").is_file()}


class WorldModel(nn.Module):
    """Composes the components; owns no training logic. Frames are (B, T, 3, H, W) in [-1, 1]."""

    def __init__(
        self, cfg: WorldModelConfig, vocabulary: Iterable[str] = (), dtype: torch.dtype = torch.float32, meta: bool = False,
        precomputed: bool = False, lazy: bool = False,
    ):
        """`vocabulary`: the words of the tiny word-level tokenizers (used only by components built
        without a pretrained folder, which bring their own tokenizer). `dtype`: the dtype pretrained
        weights are read in (components built here start in float32). `meta`: build everything on
        the meta device from configs alone (no weights read, no memory): to count and plan.
        `precomputed`: the frozen encoders (`frozen_inputs`) are left out, their outputs come with
        the batch: pretrained ones are built on meta (config only) and dropped; random ones are
        built (the same random draws as a full model) and kept aside as `frozen_input_state`.
        `lazy`: components read from a folder get their parameters on the meta device (their buffers
        as usual), the weights to be read per rank after sharding (`training.materialize`); every
        other tensor is built as in a full build, with the same random draws."""
        super().__init__()
        self.cfg = cfg
        self.vocabulary = list(vocabulary)
        self.load = load = LoadOptions(weights=cfg.weights == "pretrained", meta=meta, dtype=dtype, lazy=lazy)
        self.precomputed = precomputed
        shape_only = replace(load, meta=True) if precomputed else load  # pretrained parts: config only
        self.vision = VisionEncoder(cfg.vision, shape_only if cfg.vision.pretrained else load)
        self.llm = LLMBackbone(cfg.llm, self.vocabulary, load)
        with load.device():
            self.input_adapter = InputAdapter(cfg.input_adapter, self.vision.hidden_size, self.llm.hidden_size)
        self.generator = build_generator(cfg.generator, load.init, dtype, frozen_init="meta" if precomputed else None)
        self.generator.pretrained = generator_parts(self.generator, cfg.generator.pretrained, load)
        self._check_context(cfg)
        with load.device():
            self.output_adapter = OutputAdapter(cfg.output_adapter, self.llm.hidden_size, self.generator.context_dim)
            # The previous round's answer (its generator context, mean over tokens) -> one LLM input token.
            self.answer_adapter = nn.Linear(self.generator.context_dim, self.llm.hidden_size) if cfg.llm.previous_answer else None
        self.text_encoder = None
        if cfg.text_encoder.enabled:
            self.text_encoder = self._teacher(cfg, shape_only)
        self.frozen_input_names: list[str] = []  # parameter names of the parts left out (precomputed)
        self.frozen_input_state: dict[str, torch.Tensor] = {}  # their tensors where no folder provides them
        if precomputed:
            self._drop_frozen_inputs()
        if meta:  # a few parameters are made with legacy constructors that ignore the device context
            self.to("meta")

    def frozen_inputs(self) -> dict[str, str | None]:
        """The frozen encoders whose outputs `shards encode` stores, by module name -> the folder their
        weights come from (None: random or trained here, known by their tensors)."""
        cfg, gen = self.cfg, self.cfg.generator
        pretrained = cfg.weights == "pretrained"
        out: dict[str, str | None] = {"vision": cfg.vision.pretrained if pretrained else None}
        for part in type(self.generator).frozen_parts:
            out[f"generator.{part}"] = str(Path(gen.pretrained).expanduser() / part) if pretrained else None
        if cfg.text_encoder.enabled:
            folder = cfg.text_encoder.pretrained or (
                str(Path(gen.pretrained).expanduser() / "text_encoder") if gen.pretrained else None)
            out["text_encoder"] = folder if pretrained else None
        return out

    def _drop_frozen_inputs(self) -> None:
        if self.generator.precompute_refusal:
            raise PandoraError(f"data.precomputed: generator family {self.generator.family} cannot train from precomputed "
                               f"inputs: {self.generator.precompute_refusal}; set data.precomputed=false")
        for name, folder in self.frozen_inputs().items():
            owner, _, attr = name.rpartition(".")
            parent = self.get_submodule(owner) if owner else self
            module = getattr(parent, attr)
            state = module.state_dict()
            self.frozen_input_names += [f"{name}.{n}" for n, _ in module.named_parameters()]
            if folder is None:
                self.frozen_input_state.update({f"{name}.{k}": v.detach() for k, v in state.items()})
            setattr(parent, attr, None)

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

    def _teacher(self, cfg: WorldModelConfig, shape_only: LoadOptions):
        """The generator's own text encoder: from text_encoder.pretrained, else the generator's folder, else tiny.
        `shape_only`: how a pretrained one is built (meta when precomputed inputs replace it)."""
        gen, tokens = self.generator, cfg.output_adapter.num_queries
        if cfg.text_encoder.pretrained:
            return TextEncoder(cfg.text_encoder, tokens, gen.context_dim, self.vocabulary, shape_only)
        if gen.family == "tiny":
            return TextEncoder(cfg.text_encoder, tokens, gen.context_dim, self.vocabulary, self.load)
        if not gen.has_text_teacher:
            raise PandoraError(
                f"generator family {gen.family} has no text encoder to distill from (its cross-attention took a CLIP "
                f"image embedding): set model.text_encoder.enabled=false, loss.distill_weight=0 and loss.context=adapter "
                f"(the align stage then trains with the diffusion loss alone)"
            )
        teacher = gen.teacher(tokens, shape_only.init, self.load.dtype)
        if shape_only.read_weights:
            teacher.pretrained = {"model": str(Path(cfg.generator.pretrained).expanduser() / "text_encoder")}
        if teacher.width != gen.context_dim:
            raise PandoraError(
                f"generator '{cfg.generator.pretrained}': text_encoder/ gives {teacher.width}-wide embeddings but the "
                f"cross-attention takes {gen.context_dim} ({gen.context_key})"
            )
        return teacher

    def pretrained_modules(self) -> dict[str, str]:
        """Module name -> the local folder its weights were read from (checkpoints leave these out)."""
        out = {}
        for name, component in self.named_children():
            for sub, folder in getattr(component, "pretrained", {}).items():
                out[f"{name}.{sub}" if sub else name] = folder
        if self.precomputed:  # left out, but what the stored inputs (and a model file's users) were made with
            out.update({name: folder for name, folder in self.frozen_inputs().items() if folder})
        return out

    def provided_keys(self) -> set[str]:
        """State-dict keys whose values a pretrained folder provides: all of those modules' tensors
        except LoRA layers (which no folder holds)."""
        prefixes = tuple(f"{m}." for m in self.pretrained_modules())
        return {k for k in self.state_dict(keep_vars=True) if k.startswith(prefixes) and "lora_" not in k}

    def component_sizes(self) -> dict[str, int]:
        """Parameters per component (vision.tower, llm.model, llm.query_tokens, input_adapter, ...)."""
        sizes: dict[str, int] = {}
        for name, param in self.named_parameters():
            parts = name.split(".")
            key = ".".join(parts[:2]) if parts[0] in ("llm", "generator", "vision", "text_encoder") else parts[0]
            sizes[key] = sizes.get(key, 0) + param.numel()
        return sizes

    @property
    def cond_frames(self) -> int:
        return self.cfg.generator.cond_frames

    @property
    def new_frames(self) -> int:
        return self.cfg.generator.frames - self.cfg.generator.cond_frames

    @property
    def reads_answer(self) -> bool:
        """Whether each round reads the previous round's answer (llm.previous_answer)."""
        return self.answer_adapter is not None

    @property
    def history_rounds(self) -> int:
        """Rounds the LLM reads (1 = none before the current one, 0 = all); see models/history.py."""
        return self.cfg.llm.history_rounds

    def state_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> (B, T, K, Dllm): each frame's LLM embeddings (frames are encoded independently)."""
        b, t = frames.shape[:2]
        patches = self.vision(frames.flatten(0, 1))
        return self.input_adapter(patches.unflatten(0, (b, t))).unflatten(1, (t, -1))

    def answer_tokens(self, previous: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The previous round's answers (B, N, Dctx) as one LLM input token each (B, Dllm); None without
        llm.previous_answer. previous None (no round before): the token of an all-zero answer."""
        if self.answer_adapter is None:
            return None
        if previous is None:
            weight = self.answer_adapter.weight
            previous = weight.new_zeros(batch, 1, weight.shape[1])
        return self.answer_adapter(previous.mean(1).to(self.answer_adapter.weight.dtype))

    def round_contexts(self, frames: torch.Tensor, texts: list[list[str]], window: int | None = None) -> torch.Tensor:
        """A multi-round window: frames (B, Tc + R * F, 3, H, W), texts[r][b] -> contexts (B, R, N, Dctx).

        Round r is conditioned on frames [r * F, r * F + Tc) and reads the rounds before it through
        the LLM (teacher forcing: the frames are the real ones). Each frame is encoded once. With
        llm.previous_answer round r also reads round r - 1's answer, so the rounds run one after
        another through the key/value cache, as a session runs them (the first reads the all-zero answer).
        """
        tc, f, r = self.cond_frames, self.new_frames, len(texts)
        tokens = self.state_tokens(frames[:, : (r - 1) * f + tc])
        states = torch.stack([tokens[:, i * f : i * f + tc].flatten(1, 2) for i in range(r)], dim=1)
        if self.answer_adapter is None:
            queries = self.llm.read_rounds(states, texts, window)
            return self.output_adapter(queries.flatten(0, 1)).unflatten(0, (frames.shape[0], r))
        window = self.history_rounds if window is None else window
        b = frames.shape[0]
        # Each segment is encoded once, against the cache. An LLM that recomputes its activations in backward
        # (activation checkpointing, which turns the transformers cache off) re-reads every round so far with
        # the banded mask instead, as a session without a cache does: the same model up to float rounding, at
        # (R + 1) / 2 times the LLM's cost for windows of R rounds.
        recompute = self.training and getattr(self.llm.model, "is_activation_checkpointing", False)
        histories: list[tuple[RoundCache, ...]] = [()] * b
        positions, answers, out = [0] * b, [], []
        for i in range(r):
            answers.append(self.answer_tokens(out[-1] if out else None, b))
            if recompute:
                read = torch.stack(answers, dim=1)
                queries = self.llm.read_rounds(states[:, : i + 1], texts[: i + 1], window, read)[:, -1]
            else:
                queries, new = self.llm.step(states[:, i], texts[i], histories, positions, answers[-1])
                histories = [trim((*h, rc), window) for h, rc in zip(histories, new)]
                positions = [p + rc.tokens for p, rc in zip(positions, new)]
            out.append(self.output_adapter(queries))
        return torch.stack(out, dim=1)

    def vision_features(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> (B, T, gh, gw, Dv): the frozen vision tower's patch features of every frame."""
        b, t = frames.shape[:2]
        return self.vision(frames.flatten(0, 1)).unflatten(0, (b, t))

    def forward(self, given: torch.Tensor | None, texts: list[str], features: torch.Tensor | None = None) -> torch.Tensor:
        """given (B, Tc, 3, H, W) + B texts -> generator context (B, N, Dctx): vision encoder ->
        input adapter -> LLM -> output adapter. `features` (B, Tc, gh, gw, Dv): the vision tower's
        output, precomputed (then `given` is not read). The generator's `forward` is its training pair."""
        patches = self.vision_features(given) if features is None else features.to(self.input_adapter_dtype)
        return self.output_adapter(self.llm(self.input_adapter(patches), texts))

    @property
    def input_adapter_dtype(self) -> torch.dtype:
        return next(self.input_adapter.parameters()).dtype

    def context(self, given: torch.Tensor | None, texts: list[str], features: torch.Tensor | None = None) -> torch.Tensor:
        """The generator context that the LLM path gives for `texts` (see `forward`)."""
        return self(given, texts, features)

    def teacher_context(self, texts: list[str]) -> torch.Tensor:
        """B texts -> (B, N, Dctx): the generator's own text embedding, which `context` learns to imitate."""
        if self.text_encoder is None:
            raise PandoraError("this model has no text encoder; set model.text_encoder.enabled=true")
        return self.text_encoder(texts)
