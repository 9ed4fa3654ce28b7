"""The training recipe: what `fit` needs to train one stage (model, trainable set, data, loss,
optimiser, trainer). The top-level `pandora_lightning.recipe.RecipeConfig` adds the fit-time
evaluation block, which training knows nothing about."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from pandora_lightning.config import load_structured
from pandora_lightning.data.config import DataConfig
from pandora_lightning.models.world_model import WorldModelConfig
from pandora_lightning.training.precision import check_precision
from pandora_lightning.training.parallel import ParallelConfig

STAGE_NAMES = ("align", "instruct", "adapt")


# An adapter name becomes a key of peft's ModuleDicts and a folder name: no dots or slashes.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")
LORA_COMPONENTS = ("llm", "generator", "output_adapter")


@dataclass
class ComponentLora:
    """peft LoRA on one component; rank 0 leaves the component as it is."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    # Layer names as peft matches them (a name or a dotted ending: q_proj, attn1.to_q) or one
    # "re:<regex>" over full module names; null = the component's attention projections (for the
    # generator: its spatial and its temporal attention).
    target_modules: list[str] | None = None
    feed_forward: bool = False  # with the default targets: the feed-forward layers too

    def __post_init__(self):
        if self.rank < 0 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora: rank={self.rank} must be >= 0, alpha={self.alpha} > 0 and dropout={self.dropout} in [0, 1)")


@dataclass
class LoraConfig:
    """peft LoRA adapters per component, all under one adapter name."""

    # The adapter's name: the adapt stage's run folder (runs/<name>/adapt/<lora.name>), `--adapter NAME`.
    name: str = "default"
    llm: ComponentLora = field(default_factory=ComponentLora)
    generator: ComponentLora = field(default_factory=ComponentLora)
    output_adapter: ComponentLora = field(default_factory=ComponentLora)

    def __post_init__(self):
        if not ADAPTER_NAME.fullmatch(self.name) or self.name == "base":
            raise ValueError(f"lora.name='{self.name}': use letters, digits, '_' and '-' ('base' is reserved for no adapter)")

    def components(self) -> dict[str, ComponentLora]:
        """The components that get an adapter (rank > 0), by name."""
        return {name: getattr(self, name) for name in LORA_COMPONENTS if getattr(self, name).rank > 0}


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 50
    # After the warmup: "constant", or "cosine" down to min_lr_ratio * lr at trainer.max_steps.
    schedule: str = "constant"
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.schedule={self.schedule!r} must be 'constant' or 'cosine'")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")


LOSS_CONTEXTS = ("adapter", "teacher")


@dataclass
class LossConfig:
    """The diffusion loss on the new frames, plus the optional embedding-distillation loss."""

    # What conditions the generator in the diffusion loss: "adapter" (the LLM path, as at inference)
    # or "teacher" (the generator's own text encoder, which teaches a tiny random generator to
    # follow text as a pretrained one already does).
    context: str = "adapter"
    # Weight of the MSE that pulls the output adapter's answer towards the text encoder's
    # embedding of the same text (needs model.text_encoder.enabled).
    distill_weight: float = 0.0
    # Share of training examples whose text is replaced by the empty string, so that the model also
    # learns the text-free prediction that classifier-free guidance (generator.guidance_scale) needs.
    text_dropout: float = 0.0

    def __post_init__(self):
        if self.context not in LOSS_CONTEXTS:
            raise ValueError(f"loss.context='{self.context}' is unknown; use one of {LOSS_CONTEXTS}")
        if self.distill_weight < 0:
            raise ValueError(f"loss.distill_weight={self.distill_weight} must be >= 0")
        if not 0.0 <= self.text_dropout < 1.0:
            raise ValueError(f"loss.text_dropout={self.text_dropout} must be in [0, 1)")

    @property
    def needs_teacher(self) -> bool:
        return self.context == "teacher" or self.distill_weight > 0


@dataclass
class TrainerConfig:
    max_steps: int = 100
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    gradient_clip_val: float = 1.0
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 500
    logger: str = "csv"  # csv | tensorboard | none
    progress_bar: bool = True
    # Checkpoint to resume the whole training state from (weights, optimiser, step, data position,
    # random state); "last" = this run's checkpoints/last.ckpt.
    resume_from: str | None = None
    # An exponential moving average of the trained weights, decay per optimizer step (0: off); the final
    # model file holds the average (training/ema.py; docs/demo-model.md, "Drafts").
    ema_decay: float = 0.0

    def __post_init__(self):
        check_precision(self.precision)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"trainer.ema_decay={self.ema_decay} must be in [0, 1) (0: no average; 0.998 follows about 500 steps)")
        if self.max_steps < 1:
            raise ValueError(f"trainer.max_steps={self.max_steps} must be >= 1 (Lightning's -1, 'no limit', is not a recipe value)")
        if self.logger not in ("csv", "tensorboard", "none"):
            raise ValueError(f"trainer.logger='{self.logger}' is unknown; use csv, tensorboard or none")


@dataclass
class TrainingRecipe:
    stage: str = "align"
    name: str = "tiny"
    run_dir: str | None = None  # default runs/<name>/<stage>
    init_from: str | None = None  # checkpoint whose model weights start this run (instruct <- align)
    seed: int = 0
    # The tiny word-level tokenizer's vocabulary (used when model.llm.pretrained is null): a text
    # file with one word per line; null = every word of the training manifest's texts. It is
    # stored in the checkpoint, so a reloaded model never depends on this file again.
    vocabulary: str | None = None
    model: WorldModelConfig = field(default_factory=WorldModelConfig)
    # Globs over WorldModel parameter names; everything else is frozen.
    trainable: list[str] = field(default_factory=lambda: ["input_adapter.*", "llm.query_tokens", "output_adapter.*"])
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # How the stage is spread over processes (ddp | fsdp2), checkpointing, compile, accumulation.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        if self.stage not in STAGE_NAMES:
            raise ValueError(f"stage='{self.stage}' is unknown; use one of {STAGE_NAMES}")
        if self.run_dir is None:
            # Several adapters share one base: each adapt run has its own folder.
            self.run_dir = f"runs/{self.name}/{self.stage}" + (f"/{self.lora.name}" if self.stage == "adapt" else "")
        if self.stage == "adapt" and (not self.init_from or not self.lora.components()):
            raise ValueError(
                "stage adapt trains LoRA adapters on a base checkpoint: set init_from (an instruct checkpoint) and "
                "a rank > 0 in at least one of lora.llm, lora.generator, lora.output_adapter"
            )
        if self.loss.needs_teacher and not self.model.text_encoder.enabled:
            raise ValueError(
                f"loss.context={self.loss.context} with loss.distill_weight={self.loss.distill_weight} needs the "
                f"generator's text encoder: set model.text_encoder.enabled=true"
            )
        if self.model.llm.previous_answer and self.data.rounds < 2:
            raise ValueError(
                "model.llm.previous_answer: each round reads the round before's answer, which only multi-round windows "
                f"train; set data.rounds to 2 or more (it is {self.data.rounds})"
            )


def training_recipe_from_dict(data: dict) -> TrainingRecipe:
    """The recipe a checkpoint stores (fit-time evaluation settings, if any, are not the model's)."""
    data = {k: v for k, v in data.items() if k != "eval"}
    return load_structured(TrainingRecipe, [data], "recipe stored in checkpoint")
