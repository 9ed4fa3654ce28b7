"""`make demo`: world shards -> align -> instruct -> 8-round rollouts scored against the world.

Every held-out figure is the strict action following (`world.measure.judge_round`) with its 95%
bootstrap interval over episodes and the text-ignoring chance level on the same rounds, beside the
lenient figure; `demo --seeds N` (`make demo-seeds`) trains N times with different seeds and
reports each seed and their mean and spread.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from pandora_lightning.data.manifest import load_manifest
from pandora_lightning.errors import PandoraError
from pandora_lightning.evaluation.loop import load_episodes, run_episodes
from pandora_lightning.evaluation.suite import MetricSuite
from pandora_lightning.recipe import load_recipe, score_callbacks
from pandora_lightning.training.checkpoint import load_stage
from pandora_lightning.training.fit import fit
from pandora_lightning.training.precision import autocast
from pandora_lightning.world.domains import DOMAINS, PRACTICE_DOMAINS, TRANSFER_DOMAIN, TRANSFER_HELD_OUT, get_domain
from pandora_lightning.world.metrics import WORLD_METRICS
from pandora_lightning.world.shards import ensure_world
from pandora_lightning.world.simulator import WorldConfig
from pandora_lightning.world.vocabulary import vocabulary_path

MANIFEST = "data_manifests/world.yaml"
SHARDS = "data/world"
# Training episodes have 3 rounds (3 training windows each); held-out ones 8, for drift over long rollouts.
WORLD = WorldConfig(held_out_rounds=8)
COUNTS = {"train": 512, "val": 16, "transfer": 16, "adapt": 48, "phrasings": 4}
# Held-out episodes rolled out and scored, per domain and split (--quick: a few, to check the plumbing).
SCORED = {"val": 12, "transfer": 12, "phrasings": 4}
QUICK = {"val": 1, "transfer": 1, "phrasings": 1}
SPLIT_TITLES = {
    "val": "held-out start states",
    "transfer": f"transfer: {TRANSFER_DOMAIN} asked to {'/'.join(TRANSFER_HELD_OUT)}, never shown there in training",
    "phrasings": "phrasings held out of training",
}
# `demo --long`: the recipes' own steps times these; the world benchmark's in-domain bars, in about 27
# minutes of this 2-core CPU instead of make demo's 10 (README, "The demo model").
LONG = {"align": 2, "instruct": 4}
SHARES = ("action_following", "action_following_lenient", "action_following_held_out", "temporal_object")
# `demo --history`: episodes of 4 rounds, half of the later ones said as "again" / "go back", and
# recipes whose LLM reads earlier rounds (recipes/tiny-history).
HISTORY = {"manifest": "data_manifests/world-history.yaml", "shards": "data/world-history", "recipes": "recipes/tiny-history",
           "world": WorldConfig(rounds=4, history=0.5, held_out_rounds=8)}


# `demo --practice`'s third stage: the instruct recipe again from the instruct checkpoint, on the scored
# domains alone (data.domains) with `recolor` of the clips recoloured, at learning rate `lr` and
# `batch_size` episodes a step, for `share` of the instruct stage's steps: the practice domains and
# recoloured clips teach the transfer, the polish gives the scored domains back what sharing the model
# with them cost, and its recoloured clips keep the transfer (docs/demo-model.md, "Polish"). Each round
# after a window's first is given the generator's own low-noise draft of the round before (`draft`,
# `draft_noise`: generator.cond_draft, cond_draft_noise), so the rims a rollout hands on are repaired,
# not compounded, and the model written is the average of the polish's weights (`ema_decay`:
# trainer.ema_decay; docs/demo-model.md, "Drafts").
POLISH = {"share": 0.25, "lr": 1.0e-3, "recolor": 0.35, "batch_size": 6, "ema_decay": 0.998, "draft": 1.0, "draft_noise": 0.1}

# `demo --practice`: the world with its training-only practice domains (`counts["practice"]` episodes
# each, about 30% of the training stream) and the instruct stage shown half its clips recoloured
# (data.recolor: channel orders and inversions, kept away from the desert's sand): what carries
# grow/shrink over to the desert (README, "The demo model", "Transfer"). The model is the history
# demo's (recipes/tiny-history: the LLM reads the 2 rounds before and the previous answer), trained on
# windows of 3 rounds, a whole training episode of this world: on the same data it transfers better
# than recipes/tiny and keeps more in-domain accuracy (docs/demo-model.md, "Transfer").
PRACTICE = {"manifest": "data_manifests/world-practice.yaml", "shards": "data/world-practice",
            "world": WorldConfig(held_out_rounds=8, practice=tuple(PRACTICE_DOMAINS)), "episodes": 128,
            "recolor": 0.5, "recipes": "recipes/tiny-history", "rounds": 3, "polish": POLISH}


def transfer_look(image_size: int = WORLD.image_size) -> list[int]:
    """The transfer domain's background colour (its mean): recoloured clips stay away from it
    (data.recolor_avoid), so none shows the held-out actions in the desert's sand."""
    background = get_domain(TRANSFER_DOMAIN).background(image_size).reshape(-1, 3)
    return [round(float(v)) for v in background.mean(axis=0)]


def practice_overrides(stage: str, instruct_steps: int) -> list[str]:
    """`demo --practice`'s overrides of one stage's recipe: recoloured clips in instruct and polish (never
    in the sand's look), and the polish on the scored domains alone (POLISH) after `instruct_steps`."""
    if stage == "align":
        return []  # captions name the colours: no recolouring
    polish = PRACTICE["polish"]
    recolor = [f"data.recolor={polish['recolor'] if stage == 'polish' else PRACTICE['recolor']}",
               f"data.recolor_avoid=[{transfer_look()}]"]
    if stage == "instruct":
        return recolor
    steps = max(1, round(instruct_steps * polish["share"]))
    return [*recolor, f"data.domains=[{','.join(DOMAINS)}]", f"optim.lr={polish['lr']}",
            f"data.batch_size={polish['batch_size']}", f"trainer.max_steps={steps}", f"trainer.ema_decay={polish['ema_decay']}",
            f"model.generator.cond_draft={polish['draft']}", f"model.generator.cond_draft_noise={polish['draft_noise']}"]


def build_world(manifest: str = MANIFEST, shards: str = SHARDS) -> None:
    """Write the built-in world's shards, manifest and vocabulary unless they are already there."""
    ensure_world(manifest, shards, COUNTS, samples_per_shard=128, cfg=WORLD)


def split_summary(report: dict) -> dict:
    """The demo's figures of one split from a `MetricSuite` report."""
    out = {}
    for name in SHARES:
        if name in report:
            entry = report[name]
            out[name] = {key: entry.get(key) for key in ("overall", "interval", "per_domain", "per_round", "count")}
            if "baseline" in entry:
                out[name]["chance"] = entry["baseline"]["overall"]
                out[name]["chance_per_domain"] = entry["baseline"]["per_domain"]
    for name in ("psnr", "psnr_at_state"):
        if name in report:
            out[name] = {"overall": report[name]["overall"], "per_round": report[name]["per_round"]}
    # rounds said as "again" / "go back" (the history world), strict and lenient
    for key, share in (("history", "action_following"), ("history_lenient", "action_following_lenient")):
        entry = report.get(share, {})
        if "history" in entry:
            out[key] = {k: v for k, v in entry.items() if k in ("history", "again", "undo", "plain") or k.startswith("back_")}
    return out


def run_demo(run_dir: Path, quick: bool = False, seed: int = 0, overwrite: bool = False, history: bool = False,
             long: bool = False, practice: bool = False) -> dict:
    """The whole pipeline into `run_dir`; an earlier demo there is refused unless `overwrite`."""
    if history and practice:
        raise PandoraError("demo --history --practice: choose one (the practice world has no history rounds)")
    started = time.time()
    timings = {}
    manifest_path, recipes = (HISTORY["manifest"], HISTORY["recipes"]) if history else (MANIFEST, "recipes/tiny")
    world = []  # recipe overrides that point at another world
    if history:
        ensure_world(HISTORY["manifest"], HISTORY["shards"], COUNTS, 128, HISTORY["world"])
    elif practice:
        manifest_path, recipes = PRACTICE["manifest"], PRACTICE["recipes"]
        ensure_world(manifest_path, PRACTICE["shards"], {**COUNTS, "practice": PRACTICE["episodes"]}, 128, PRACTICE["world"])
        world = [f"data.manifest={manifest_path}", f"vocabulary={vocabulary_path(manifest_path)}",
                 f"data.rounds={PRACTICE['rounds']}"]
    else:
        build_world()
    timings["shards_s"] = round(time.time() - started, 1)
    steps = {"align": 3, "instruct": 3} if quick else {}
    checkpoint = None
    for stage in ("align", "instruct", "polish") if practice else ("align", "instruct"):
        overrides = [f"run_dir={run_dir / stage}", f"seed={seed}", *world]
        if practice:
            overrides += practice_overrides(stage, steps.get("instruct", 0))
        if checkpoint:
            overrides.append(f"init_from={checkpoint}")
        if stage in steps:
            overrides.append(f"trainer.max_steps={steps[stage]}")
        recipe_file = f"{recipes}/{'instruct' if stage == 'polish' else stage}.yaml"
        recipe = load_recipe(recipe_file, overrides)
        if long and stage in LONG:
            overrides.append(f"trainer.max_steps={recipe.trainer.max_steps * LONG[stage]}")
            recipe = load_recipe(recipe_file, overrides)
        t0 = time.time()
        checkpoint = fit(recipe, score_callbacks(recipe, [WORLD_METRICS]), overwrite=overwrite)
        timings[f"{stage}_s"] = round(time.time() - t0, 1)
        steps[stage] = recipe.trainer.max_steps

    t0 = time.time()
    model = load_stage(checkpoint).model
    manifest = load_manifest(manifest_path)
    results = {}
    for split, per_domain in (QUICK if quick else SCORED).items():
        episodes = load_episodes(manifest, split, per_domain, model.cfg.generator.size)
        suite = MetricSuite(episodes, model.cond_frames, model.new_frames, plugins=[WORLD_METRICS])
        with autocast(model.precision, "cpu"):  # the training precision, as `score` and `generate` do
            run_episodes(model, episodes, suite, batch_size=32, media_dir=run_dir / "rollouts", name=split)
        results[split] = split_summary(suite.report())
    timings["rollouts_s"] = round(time.time() - t0, 1)
    summary = {
        "splits": results,
        "seed": seed,
        "steps": steps,
        "wall_seconds": {**timings, "total_s": round(time.time() - started, 1)},
        "checkpoint": str(checkpoint),
        "rollouts": str(run_dir / "rollouts"),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return summary


def run_seeds(run_dir: Path, seeds: int, quick: bool = False, overwrite: bool = False, history: bool = False,
              long: bool = False, practice: bool = False) -> dict:
    """The demo trained `seeds` times (seeds 0..N-1, each in run_dir/seed-<s>); their spread per figure."""
    runs = [run_demo(run_dir / f"seed-{s}", quick=quick, seed=s, overwrite=overwrite, history=history, long=long,
                     practice=practice)
            for s in range(seeds)]
    summary = {"seeds": list(range(seeds)), "figures": seed_spread([r["splits"] for r in runs]),
               "wall_seconds": [r["wall_seconds"]["total_s"] for r in runs]}
    (run_dir / "seeds.json").write_text(json.dumps(summary, indent=2))
    print_seeds(summary)
    return summary


def seed_spread(splits_per_seed: list[dict]) -> dict:
    """{split: {figure: {"mean", "std", "min", "max", "values"}}} over seeds for every overall figure."""
    out: dict = {}
    for split in splits_per_seed[0]:
        for name in splits_per_seed[0][split]:
            values = [run[split][name]["overall"] for run in splits_per_seed if name in run.get(split, {})]
            values = [v for v in values if v is not None]
            if values:
                out.setdefault(split, {})[name] = {
                    "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values), "max": max(values), "values": values,
                }
    return out


def _share(entry: dict) -> str:
    text = f"{entry['overall']:.3f}"
    if entry.get("interval"):
        text += f" [{entry['interval'][0]:.2f}, {entry['interval'][1]:.2f}]"
    if entry.get("chance") is not None:
        text += f" (chance {entry['chance']:.2f})"
    return text


def print_summary(summary: dict) -> None:
    print("\n=== pandora-lightning demo ===")
    print("strict: object kept and moved/resized within 35% of the domain's rate; [95% interval over episodes];")
    print("chance: the best predictor that ignores the action text but sees the state, on the same rounds")
    for split, res in summary["splits"].items():
        print(f"{SPLIT_TITLES.get(split, split)}:")
        strict = res.get("action_following")
        if strict:
            domains = ", ".join(f"{d} {v:.2f}" for d, v in strict["per_domain"].items())
            print(f"  action following, strict   {_share(strict)} over {strict['count']} rounds ({domains})")
            rounds = " ".join("n/a" if v is None else f"{v:.2f}" for v in strict["per_round"])
            print(f"    per round: {rounds}")
        if "action_following_held_out" in res:
            print(f"  held-out actions, strict   {_share(res['action_following_held_out'])} over "
                  f"{res['action_following_held_out']['count']} rounds")
        if "action_following_lenient" in res:
            print(f"  action following, lenient  {_share(res['action_following_lenient'])}")
        extra = []
        if "temporal_object" in res:
            extra.append(f"object kept {res['temporal_object']['overall']:.3f}")
        if "psnr" in res:
            extra.append("PSNR by round " + " ".join("n/a" if v is None else f"{v:.1f}" for v in res["psnr"]["per_round"]))
        if extra:
            print("  " + "; ".join(extra))
        if "psnr_at_state" in res:  # drawing alone: against the state each frame shows (world/metrics.StateFidelity)
            print("  PSNR at the state shown, by round " + " ".join(f"{v:.1f}" for v in res["psnr_at_state"]["per_round"]))
        for key, kind in (("history", "strict"), ("history_lenient", "lenient")):
            if key in res:
                h = res[key]
                said = {k: "n/a" if h.get(k) is None else f"{h[k]:.3f}" for k in ("again", "undo")}
                print(f"  rounds said as 'again'/'go back', {kind}: {h['history']:.3f} (again {said['again']}, undo "
                      f"{said['undo']}); other rounds {h['plain']:.3f}")
                back = sorted(int(k[5:]) for k in h if k.startswith("back_") and not k.endswith("_count"))
                if back:
                    print("    by rounds back to the action said plainly: "
                          + ", ".join(f"{d}: {h[f'back_{d}']:.2f} ({h[f'back_{d}_count']:.0f})" for d in back))
    print(f"seed {summary['seed']}, steps: {summary['steps']}")
    print(f"wall seconds: {summary['wall_seconds']}")
    print(f"videos and contact sheets: {summary['rollouts']}")


def print_seeds(summary: dict) -> None:
    print(f"\n=== pandora-lightning demo over seeds {summary['seeds']} ===")
    for split, figures in summary["figures"].items():
        print(f"{SPLIT_TITLES.get(split, split)}:")
        for name, f in figures.items():
            values = ", ".join(f"{v:.3f}" for v in f["values"])
            print(f"  {name}: mean {f['mean']:.3f}, std {f['std']:.3f} (seeds: {values})")
