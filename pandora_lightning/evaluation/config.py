"""Evaluation settings: `eval` (scoring during fit, in a training recipe) and the `score` recipe."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pandora_lightning.config import load_structured
from pandora_lightning.errors import PandoraError


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
class ScoreConfig:
    checkpoint: str = ""
    manifest: str | None = None  # default: the manifest the checkpoint was trained on
    splits: list[str] = field(default_factory=list)  # empty: every held-out (non-train) split of the manifest
    per_domain: int = 16  # episodes per domain and split; 0 = all
    batch_size: int = 16
    seed: int = 0
    out: str | None = None  # default: <checkpoint's run folder>/scores/<checkpoint name>
    fvd_detector: str | None = None  # TorchScript I3D file (e.g. i3d_torchscript.pt); FVD is skipped without it
    fvd_feature_dim: int = 400
    clip_model: str | None = None  # local CLIPModel + tokenizer directory; clip_score is skipped without it
    save_videos: bool = False  # an mp4 per rollout and contact sheets beside the scores
    num_inference_steps: int | None = None  # sampler steps per round; null = the checkpoint's recipe
    allow_commands: bool = False  # read pipe:/URL shard sources of the manifest: they RUN COMMANDS
    # An adapter to run on the checkpoint: an adapter folder, or the name of an adapt run beside the
    # checkpoint's run (runs/<name>/adapt/<adapter>); null = the checkpoint as it is.
    adapter: str | None = None
    device: str | None = None  # cpu, cuda, cuda:N; null = a GPU when there is one
    precision: str | None = None  # 32-true, bf16-mixed, 16-mixed, ...; null = the checkpoint's training precision

    def __post_init__(self):
        if self.per_domain < 0 or self.batch_size < 1 or self.fvd_feature_dim < 1 or (self.num_inference_steps or 1) < 1:
            raise ValueError("per_domain must be >= 0; batch_size, fvd_feature_dim and num_inference_steps >= 1")


def load_score_config(path: str | Path | None = None, overrides: list[str] = (), values: dict | None = None) -> ScoreConfig:
    """A score recipe (optional YAML) + command-line values + key=value overrides, in that order."""
    sources = ([path] if path else []) + [values or {}, list(overrides)]
    config = load_structured(ScoreConfig, sources, f"score recipe {path}" if path else "score")
    if not config.checkpoint:
        raise PandoraError("score: no checkpoint given (pandora-lightning score CHECKPOINT, or checkpoint= in the recipe)")
    return config
