"""`score`: roll a checkpoint out on a manifest's held-out samples and compute every metric the
inputs allow; write scores.json, scores.md and PNG plots.

| metric | computed when |
| --- | --- |
| psnr, ssim (per frame, round, domain) | the samples' action spans line up with the model's rounds |
| fvd | `fvd_detector` names a TorchScript I3D file |
| clip_score | `clip_model` names a local CLIP directory |
| a domain's own metrics (the built-in world: action_following, temporal_object, temporal_background, psnr_at_state) | a plugin given to `run_score` recognises the episodes |

A metric that cannot run is listed under "skipped" with the reason, never left out silently.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from pandora_lightning.data.frames import from_numpy
from pandora_lightning.data.manifest import Manifest, load_manifest
from pandora_lightning.errors import PandoraError
from pandora_lightning.evaluation.config import ScoreConfig
from pandora_lightning.evaluation.loop import load_episodes, run_episodes
from pandora_lightning.evaluation.report import markdown, write_report
from pandora_lightning.evaluation.suite import Episode, EpisodeMetrics, MetricSuite, load_weights
from pandora_lightning.training.adapters import attach_adapters
from pandora_lightning.training.checkpoint import load_stage
from pandora_lightning.training.lora import use_adapter
from pandora_lightning.training.precision import autocast, resolve_device


TRAINING_SPLITS = ("train", "adapt")


def held_out_splits(manifest: Manifest, requested: list[str]) -> list[str]:
    for split in requested:
        manifest.sets_for(split)  # names the manifest and its splits when missing
    # "adapt" holds the adapt stage's training samples: never scored as held out.
    held_out = list(requested) or sorted((s for s in manifest.splits() if s not in TRAINING_SPLITS), key=lambda s: (s != "val", s))
    if not held_out:
        raise PandoraError(
            f"manifest {manifest.path} has no held-out samples: its only split is 'train'; score needs a 'val' or "
            f"'transfer' split (`pandora-lightning shards world --val N` writes one)"
        )
    return held_out


def default_out_dir(checkpoint: str | Path, adapter: str | None = None) -> Path:
    path = Path(checkpoint)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return run_dir / "scores" / (f"{path.stem}+{adapter}" if adapter else path.stem)


def score_split(
    model, episodes: list[Episode], cfg: ScoreConfig, weights, out_dir: Path | None, split: str, plugins: Sequence[EpisodeMetrics]
) -> dict:
    detector, embedder, reasons = weights
    cond, new = model.cond_frames, model.new_frames
    if detector is not None:  # a wrong detector fails here, before any generation
        t = min(len(episodes[0][1]), cond + len(episodes[0][2]["actions"]) * new)
        detector(from_numpy(episodes[0][1][:t])[None])
    suite = MetricSuite(episodes, cond, new, detector, embedder, reasons, plugins)
    media = out_dir / "rollouts" if out_dir is not None else None
    rounds = run_episodes(model, episodes, suite, cfg.batch_size, cfg.seed, media, split, progress=f"score {split}")
    return {"episodes": len(episodes), "rounds": rounds, "metrics": suite.report(), "skipped": suite.skipped}


def run_score(cfg: ScoreConfig, plugins: Sequence[EpisodeMetrics] = ()) -> dict:
    """Score `cfg.checkpoint` on each held-out split; writes the report and returns scores.json's content.

    `plugins`: the domains' own metrics (e.g. `pandora_lightning.world.metrics.WORLD_METRICS`).
    """
    started = time.time()
    if cfg.manifest:  # the cheap checks first, before the model loads
        manifest = load_manifest(cfg.manifest, allow_commands=cfg.allow_commands)
        splits = held_out_splits(manifest, list(cfg.splits))
    device = resolve_device(cfg.device)
    module = load_stage(cfg.checkpoint, device, cfg.precision)
    model = module.model
    adapters = attach_adapters(module, cfg.checkpoint, [cfg.adapter] if cfg.adapter else [])
    if adapters:
        use_adapter(model, adapters[0])
    if cfg.num_inference_steps:
        model.generator.cfg.num_inference_steps = cfg.num_inference_steps
    manifest_path = cfg.manifest or module.recipe.data.manifest
    if not cfg.manifest:
        manifest = load_manifest(manifest_path, allow_commands=cfg.allow_commands)
        splits = held_out_splits(manifest, list(cfg.splits))
    size = model.cfg.generator.size
    corrupt: list[tuple[str, str]] = []
    episodes = {split: load_episodes(manifest, split, cfg.per_domain, size, corrupt) for split in splits}
    weights = load_weights(cfg)
    out_dir = Path(cfg.out) if cfg.out else default_out_dir(cfg.checkpoint, adapters[0] if adapters else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for split in splits:
        t0 = time.time()
        with autocast(module.recipe.trainer.precision, device):
            results[split] = score_split(model, episodes[split], cfg, weights, out_dir if cfg.save_videos else None, split, plugins)
        results[split]["seconds"] = round(time.time() - t0, 1)
    skipped = {}
    for res in results.values():
        skipped.update(res.pop("skipped"))
    scores = {
        "checkpoint": str(cfg.checkpoint),
        "stage": module.stage,
        "adapter": adapters[0] if adapters else None,
        "manifest": str(manifest_path),
        "seed": cfg.seed,
        "per_domain": cfg.per_domain,
        "splits": results,
        "skipped": skipped,
        "corrupt_samples_skipped": [{"sample": where, "reason": why} for where, why in corrupt],
        "wall_seconds": round(time.time() - started, 1),
    }
    (out_dir / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    write_report(scores, out_dir)
    return scores | {"out_dir": str(out_dir)}


def print_scores(scores: dict) -> None:
    print(markdown(scores).split("\n## Metrics")[0])
    if scores.get("corrupt_samples_skipped"):
        print(f"skipped {len(scores['corrupt_samples_skipped'])} corrupt held-out samples (listed in scores.json)")
    print(f"wrote scores.json, scores.md, domains.png and rounds.png to {scores['out_dir']}")
