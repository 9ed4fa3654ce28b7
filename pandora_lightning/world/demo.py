"""`make demo`: world shards -> align -> instruct -> multi-round rollouts scored against the world."""
from __future__ import annotations

import json
import time
from pathlib import Path

from pandora_lightning.data.manifest import load_manifest
from pandora_lightning.evaluation.loop import load_episodes, run_episodes
from pandora_lightning.evaluation.suite import MetricSuite
from pandora_lightning.recipe import load_recipe, score_callbacks
from pandora_lightning.training.checkpoint import load_stage
from pandora_lightning.training.fit import fit
from pandora_lightning.world.domains import TRANSFER_DOMAIN
from pandora_lightning.world.metrics import WORLD_METRICS
from pandora_lightning.world.shards import ensure_world

MANIFEST = "data_manifests/world.yaml"
SHARDS = "data/world"
COUNTS = {"train": 512, "val": 16, "transfer": 16, "adapt": 48}


def build_world(manifest: str = MANIFEST, shards: str = SHARDS) -> None:
    """Write the built-in world's shards, manifest and vocabulary unless they are already there."""
    ensure_world(manifest, shards, COUNTS, samples_per_shard=128)


def run_demo(run_dir: Path, quick: bool = False) -> dict:
    started = time.time()
    timings = {}
    build_world()
    timings["shards_s"] = round(time.time() - started, 1)
    steps = {"align": 3, "instruct": 3} if quick else {}
    checkpoint = None
    for stage in ("align", "instruct"):
        overrides = [f"run_dir={run_dir / stage}"]
        if checkpoint:
            overrides.append(f"init_from={checkpoint}")
        if stage in steps:
            overrides.append(f"trainer.max_steps={steps[stage]}")
        recipe = load_recipe(f"recipes/tiny/{stage}.yaml", overrides)
        t0 = time.time()
        checkpoint = fit(recipe, score_callbacks(recipe, [WORLD_METRICS]))
        timings[f"{stage}_s"] = round(time.time() - t0, 1)
        steps[stage] = recipe.trainer.max_steps

    t0 = time.time()
    model = load_stage(checkpoint).model
    manifest = load_manifest(MANIFEST)
    results = {}
    for split in ("val", "transfer"):
        episodes = load_episodes(manifest, split, 2 if quick else 16, model.cfg.generator.image_size)
        suite = MetricSuite(episodes, model.cond_frames, model.new_frames, plugins=[WORLD_METRICS])
        run_episodes(model, episodes, suite, batch_size=32, media_dir=run_dir / "rollouts", name=split)
        report = suite.report()["action_following"]
        results[split] = {"overall": report["overall"], "per_domain": report["per_domain"], "rounds": report["count"]}
    timings["rollouts_s"] = round(time.time() - t0, 1)
    summary = {
        "action_following": {
            "held_out_start_states": results["val"],
            f"transfer_{TRANSFER_DOMAIN}_unseen_actions": results["transfer"],
        },
        "steps": steps,
        "wall_seconds": {**timings, "total_s": round(time.time() - started, 1)},
        "checkpoint": str(checkpoint),
        "rollouts": str(run_dir / "rollouts"),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    print("\n=== pandora-lightning demo ===")
    for name, res in summary["action_following"].items():
        domains = ", ".join(f"{d} {a:.2f}" for d, a in res["per_domain"].items())
        print(f"action-following accuracy, {name}: {res['overall']:.3f} over {res['rounds']} rounds ({domains})")
    print(f"steps: {summary['steps']}")
    print(f"wall seconds: {summary['wall_seconds']}")
    print(f"videos and contact sheets: {summary['rollouts']}")
