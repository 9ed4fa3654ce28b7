"""Recipes: YAML -> OmegaConf structured config (struct mode) -> typed dataclasses.

One route for every config in the project: `load_structured(Schema, yaml_path, overrides)`.
Unknown keys, wrong types and failed `__post_init__` checks all become a `ConfigError` that names
the file, the key and, for typos, the nearest valid keys.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from pandora_lightning.models.world_model import WorldModelConfig

STAGE_NAMES = ("align", "instruct")
T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe, manifest or override that cannot be used as written."""


@dataclass
class DataConfig:
    manifest: str = "data_manifests/world.yaml"
    split: str = "train"
    batch_size: int = 8
    num_workers: int = 1
    shuffle_buffer: int = 128
    max_bad_fraction: float = 0.05  # stop the run when more than this share of samples is corrupt
    epoch_samples: int = 0  # samples an epoch over the whole job; 0 = the split's sample count in the manifest
    # Which text of a sample steers the generator: caption | action; null = the stage's own
    # (align: caption, instruct: action).
    text_kind: str | None = None

    def __post_init__(self):
        if self.batch_size < 1 or self.num_workers < 0 or self.epoch_samples < 0:
            raise ValueError("data.batch_size must be >= 1, data.num_workers and data.epoch_samples >= 0")
        if self.text_kind not in (None, "caption", "action"):
            raise ValueError(f"data.text_kind='{self.text_kind}' is unknown; use caption, action or null")


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
class EvalConfig:
    """Scoring during fit: the `score` metrics on held-out rollouts, logged every N steps (0 = off)."""

    every_n_steps: int = 0
    manifest: str | None = None  # default: data.manifest
    split: str = "val"
    per_domain: int = 2  # held-out episodes per domain
    batch_size: int = 8
    seed: int = 0
    fvd_detector: str | None = None  # TorchScript I3D file; FVD is skipped without it
    fvd_feature_dim: int = 400
    clip_model: str | None = None  # local CLIP directory; text-video similarity is skipped without it

    def __post_init__(self):
        if self.every_n_steps < 0 or self.per_domain < 1 or self.batch_size < 1:
            raise ValueError("eval.every_n_steps must be >= 0, eval.per_domain and eval.batch_size >= 1")


@dataclass
class RecipeConfig:
    stage: str = "align"
    name: str = "tiny"
    run_dir: str | None = None  # default runs/<name>/<stage>
    init_from: str | None = None  # checkpoint whose model weights start this run (instruct <- align)
    seed: int = 0
    model: WorldModelConfig = field(default_factory=WorldModelConfig)
    # Globs over WorldModel parameter names; everything else is frozen.
    trainable: list[str] = field(default_factory=lambda: ["input_adapter.*", "llm.query_tokens", "output_adapter.*"])
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

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


def _nearest_keys(err: ConfigKeyError) -> str:
    key = str(err.key)
    schema = err.object_type
    valid = [f.name for f in fields(schema)] if schema is not None and is_dataclass(schema) else []
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"valid keys here: {', '.join(valid)}"
    return f"unknown key '{err.full_key or key}' ({hint})"


def load_structured(schema_cls: type[T], sources: list[Any], what: str) -> T:
    """Merge `sources` (YAML paths, dicts, or "key=value" lists) onto the schema and build the dataclass."""
    schema = OmegaConf.structured(schema_cls)
    layers = []
    for src in sources:
        if isinstance(src, (str, Path)):
            path = Path(src)
            if not path.is_file():
                raise ConfigError(f"{what}: file '{path}' does not exist")
            layers.append(OmegaConf.load(path))
        elif isinstance(src, list):
            bad = [s for s in src if "=" not in s]
            if bad:
                raise ConfigError(f"{what}: overrides must look like key=value, got {bad}")
            layers.append(OmegaConf.from_dotlist(src))
        else:
            layers.append(OmegaConf.create(src))
    try:
        merged = OmegaConf.merge(schema, *layers)
        return OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        raise ConfigError(f"{what}: {_nearest_keys(err)}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{what}: {type(err).__name__}: {str(err).splitlines()[0]} (key '{err.full_key}')") from None
    except ValueError as err:
        raise ConfigError(f"{what}: {err}") from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> RecipeConfig:
    return load_structured(RecipeConfig, [path, list(overrides)], f"recipe {path}")


def recipe_from_dict(data: dict) -> RecipeConfig:
    return load_structured(RecipeConfig, [data], "recipe stored in checkpoint")


def recipe_to_dict(recipe: RecipeConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(recipe))
