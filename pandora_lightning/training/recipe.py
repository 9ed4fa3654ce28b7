"""The training recipe: what `fit` needs to train one stage (model, trainable set, data, loss,
optimiser, trainer). The top-level `pandora_lightning.recipe.RecipeConfig` adds the fit-time
evaluation block, which training knows nothing about."""
from __future__ import annotations

from dataclasses import dataclass, field

from pandora_lightning.config import load_structured
from pandora_lightning.data.config import DataConfig
from pandora_lightning.models.world_model import WorldModelConfig

STAGE_NAMES = ("align", "instruct")


@dataclass
class LoraConfig:
    """peft LoRA on the LLM; rank 0 leaves the LLM as it is."""

    rank: int = 0
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 50


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

    def __post_init__(self):
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

    def __post_init__(self):
        if self.stage not in STAGE_NAMES:
            raise ValueError(f"stage='{self.stage}' is unknown; use one of {STAGE_NAMES}")
        if self.run_dir is None:
            self.run_dir = f"runs/{self.name}/{self.stage}"
        if self.loss.needs_teacher and not self.model.text_encoder.enabled:
            raise ValueError(
                f"loss.context={self.loss.context} with loss.distill_weight={self.loss.distill_weight} needs the "
                f"generator's text encoder: set model.text_encoder.enabled=true"
            )


def training_recipe_from_dict(data: dict) -> TrainingRecipe:
    """The recipe a checkpoint stores (fit-time evaluation settings, if any, are not the model's)."""
    data = {k: v for k, v in data.items() if k != "eval"}
    return load_structured(TrainingRecipe, [data], "recipe stored in checkpoint")
