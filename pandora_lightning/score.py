"""`score`: roll a checkpoint out on a manifest's held-out samples and compute every metric the
inputs allow; write scores.json, scores.md and PNG plots.

| metric | computed when |
| --- | --- |
| psnr, ssim (per frame, round, domain) | the samples' action spans line up with the model's rounds |
| fvd | `fvd_detector` names a TorchScript I3D file |
| clip_score | `clip_model` names a local CLIP directory |
| action_following, temporal_object, temporal_background | the samples are built-in world episodes |

A metric that cannot run is listed under "skipped" with the reason, never left out silently.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pandora_lightning.config import ConfigError, load_structured
from pandora_lightning.data.dataset import iterate_split
from pandora_lightning.data.manifest import Manifest, load_manifest
from pandora_lightning.evaluate import Episode, RolloutBatch, model_rollout, rollout_batches, to_tensor, write_media
from pandora_lightning.metrics import (
    ActionFollowing,
    ClipEmbedder,
    DomainMetric,
    FrechetVideoDistance,
    TemporalConsistency,
    TextVideoSimilarity,
    VideoDetector,
    VideoPSNR,
    VideoSSIM,
)
from pandora_lightning.world import DOMAINS


@dataclass
class ScoreConfig:
    checkpoint: str = ""
    manifest: str = "data_manifests/world.yaml"
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

    def __post_init__(self):
        if self.per_domain < 0 or self.batch_size < 1 or self.fvd_feature_dim < 1 or (self.num_inference_steps or 1) < 1:
            raise ValueError("per_domain must be >= 0; batch_size, fvd_feature_dim and num_inference_steps >= 1")


def load_score_config(path: str | Path | None = None, overrides: list[str] = (), values: dict | None = None) -> ScoreConfig:
    """A score recipe (optional YAML) + command-line values + key=value overrides, in that order."""
    sources = ([path] if path else []) + [values or {}, list(overrides)]
    config = load_structured(ScoreConfig, sources, f"score recipe {path}" if path else "score")
    if not config.checkpoint:
        raise ConfigError("score: no checkpoint given (pandora-lightning score CHECKPOINT, or checkpoint= in the recipe)")
    return config


def held_out_splits(manifest: Manifest, requested: list[str]) -> list[str]:
    for split in requested:
        manifest.sets_for(split)  # names the manifest and its splits when missing
    held_out = list(requested) or sorted((s for s in manifest.splits() if s != "train"), key=lambda s: (s != "val", s))
    if not held_out:
        raise ConfigError(
            f"manifest {manifest.path} has no held-out samples: its only split is 'train'; score needs a 'val' or "
            f"'transfer' split (`pandora-lightning shards world --val N` writes one)"
        )
    return held_out


def is_world(episodes: list[Episode]) -> bool:
    return all(
        meta.get("source") == "world" and meta.get("domain") in DOMAINS and all("action" in a for a in meta["actions"])
        for _, _, meta in episodes
    )


def rounds_line_up(episodes: list[Episode], cond: int, new: int) -> bool:
    """Whether each sample's round r spans frames [cond + r*new, cond + (r+1)*new) of its video."""
    return all(
        a["start"] == cond + r * new and a["end"] == a["start"] + new and a["end"] <= len(frames)
        for _, frames, meta in episodes
        for r, a in enumerate(meta["actions"])
    )


class MetricSuite:
    """Every metric the inputs allow for one split; `skipped` maps the others to the reason."""

    def __init__(self, episodes: list[Episode], cond: int, new: int, detector=None, embedder=None, reasons=None):
        self.cond, self.new = cond, new
        self.domains = sorted({meta.get("domain", "") for _, _, meta in episodes})
        self.metrics: dict[str, DomainMetric] = {}
        self.skipped: dict[str, str] = dict(reasons or {})
        if rounds_line_up(episodes, cond, new):
            self.metrics["psnr"] = VideoPSNR(self.domains, frames_per_round=new)
            self.metrics["ssim"] = VideoSSIM(self.domains, frames_per_round=new)
        else:
            why = f"the samples' action spans do not line up with the model's rounds ({cond} given + {new} new frames)"
            self.skipped["psnr"] = self.skipped["ssim"] = why
        long_enough = all(len(frames) >= cond + len(meta["actions"]) * new for _, frames, meta in episodes)
        if detector is not None and long_enough:
            self.metrics["fvd"] = FrechetVideoDistance(detector, self.domains)
        elif detector is not None:
            self.skipped["fvd"] = "some ground-truth clips are shorter than their rollouts, so there is no real clip to compare"
        if embedder is not None:
            self.metrics["clip_score"] = TextVideoSimilarity(embedder, self.domains)
        if is_world(episodes):
            self.metrics["action_following"] = ActionFollowing(cond, new, self.domains)
            self.metrics["temporal"] = TemporalConsistency(cond, new, self.domains)
        else:
            why = "the samples are not built-in world episodes (source 'world' with canonical actions)"
            for name in ("action_following", "temporal_object", "temporal_background"):
                self.skipped[name] = why

    def to(self, device) -> MetricSuite:
        for metric in self.metrics.values():
            metric.to(device)
        return self

    def update(self, batch: RolloutBatch) -> None:
        videos = batch.videos.detach()
        domains = [ep.get("domain", "") for ep in batch.episodes]
        t = videos.shape[1]
        m = self.metrics
        if "psnr" in m or "fvd" in m:
            truth = torch.stack([to_tensor(frames[:t]) for frames in batch.truth]).to(videos.device)
            for name in ("psnr", "ssim"):
                if name in m:
                    m[name].update(videos[:, self.cond :], truth[:, self.cond :], domains)
            if "fvd" in m:
                m["fvd"].update(truth, real=True, domains=domains)
                m["fvd"].update(videos, real=False, domains=domains)
        if "clip_score" in m:
            texts = [ep.get("caption") or ", then ".join(a["text"] for a in ep["actions"]) for ep in batch.episodes]
            m["clip_score"].update(videos, texts, domains)
        for name in ("action_following", "temporal"):
            if name in m:
                m[name].update(videos, batch.episodes)

    def report(self) -> dict[str, dict]:
        out = {}
        for name, metric in self.metrics.items():
            out.update(metric.report())
            if isinstance(metric, ActionFollowing):
                out["action_following"]["confusion"] = metric.confusion_table()
        return out

    def scalars(self) -> dict[str, float]:
        return {name: entry["overall"] for name, entry in self.report().items() if entry.get("overall") is not None}


def load_weights(cfg) -> tuple[VideoDetector | None, ClipEmbedder | None, dict[str, str]]:
    """The detector and CLIP model the config names (errors name the file), and why any is missing."""
    reasons = {}
    detector = embedder = None
    if cfg.fvd_detector:
        detector = VideoDetector(cfg.fvd_detector, cfg.fvd_feature_dim)
    else:
        reasons["fvd"] = "no detector given: set fvd_detector to a TorchScript I3D file (e.g. i3d_torchscript.pt)"
    if cfg.clip_model:
        embedder = ClipEmbedder(cfg.clip_model)
    else:
        reasons["clip_score"] = "no CLIP model given: set clip_model to a local CLIP directory (save_pretrained)"
    return detector, embedder, reasons


def load_episodes(manifest: Manifest, split: str, per_domain: int | None, image_size: int) -> list[Episode]:
    episodes = list(iterate_split(manifest, split, per_domain=per_domain or None))
    if not episodes:
        raise ConfigError(f"manifest {manifest.path}: split '{split}' has no samples to score")
    key, frames, _ = episodes[0]
    if frames.shape[1:3] != (image_size, image_size):
        raise ConfigError(
            f"manifest {manifest.path}: sample {key} is {frames.shape[2]}x{frames.shape[1]} but the checkpoint "
            f"generates {image_size}x{image_size} frames"
        )
    return episodes


def default_out_dir(checkpoint: str | Path) -> Path:
    path = Path(checkpoint)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return run_dir / "scores" / path.stem


def score_split(model, episodes: list[Episode], cfg: ScoreConfig, weights, out_dir: Path | None, split: str) -> dict:
    detector, embedder, reasons = weights
    cond, new = model.cond_frames, model.new_frames
    if detector is not None:  # a wrong detector fails here, before any generation
        t = min(len(episodes[0][1]), cond + len(episodes[0][2]["actions"]) * new)
        detector(to_tensor(episodes[0][1][:t])[None])
    suite = MetricSuite(episodes, cond, new, detector, embedder, reasons)
    rounds = 0
    for batch in rollout_batches(model_rollout(model), episodes, cfg.batch_size, cfg.seed):
        suite.update(batch)
        rounds += batch.rounds * len(batch.keys)
        if out_dir is not None:
            write_media(batch, out_dir / "rollouts", split)
    return {"episodes": len(episodes), "rounds": rounds, "metrics": suite.report(), "skipped": suite.skipped}


def run_score(cfg: ScoreConfig) -> dict:
    """Score `cfg.checkpoint` on each held-out split; writes the report and returns scores.json's content."""
    from pandora_lightning.score_report import write_report
    from pandora_lightning.stages import load_stage

    started = time.time()
    module = load_stage(cfg.checkpoint)
    model = module.model
    if cfg.num_inference_steps:
        model.generator.cfg.num_inference_steps = cfg.num_inference_steps
    manifest = load_manifest(cfg.manifest)
    splits = held_out_splits(manifest, list(cfg.splits))
    image_size = model.cfg.generator.image_size
    episodes = {split: load_episodes(manifest, split, cfg.per_domain, image_size) for split in splits}
    weights = load_weights(cfg)
    out_dir = Path(cfg.out) if cfg.out else default_out_dir(cfg.checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for split in splits:
        t0 = time.time()
        results[split] = score_split(model, episodes[split], cfg, weights, out_dir if cfg.save_videos else None, split)
        results[split]["seconds"] = round(time.time() - t0, 1)
    skipped = {}
    for res in results.values():
        skipped.update(res.pop("skipped"))
    scores = {
        "checkpoint": str(cfg.checkpoint),
        "stage": module.stage,
        "manifest": str(cfg.manifest),
        "seed": cfg.seed,
        "per_domain": cfg.per_domain,
        "splits": results,
        "skipped": skipped,
        "wall_seconds": round(time.time() - started, 1),
    }
    (out_dir / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    write_report(scores, out_dir)
    return scores | {"out_dir": str(out_dir)}


def print_scores(scores: dict) -> None:
    from pandora_lightning.score_report import markdown

    print(markdown(scores).split("\n## Metrics")[0])
    print(f"wrote scores.json, scores.md, domains.png and rounds.png to {scores['out_dir']}")
