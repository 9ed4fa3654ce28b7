"""`make bench` (training part): one training step through the Lightning stage vs the same step in a plain PyTorch loop,
and the data path (shard loader vs per-file loaders, `shards build` throughput; see bench/data.py).

Both runs use the same recipe, the same initial weights, the same in-memory batches and the same
optimiser and schedule; only the loop around `losses` differs. Steps are timed end to end
(step end to step end) after a warm-up, and the two loops alternate to cancel machine drift.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from itertools import islice
from pathlib import Path

import lightning as L
import torch

from pandora_lightning.recipe import RecipeConfig, load_recipe
from pandora_lightning.training.fit import build_trainer, train_loader
from pandora_lightning.training.stage import STAGES
from pandora_lightning.training.vocabulary import resolve_vocabulary
from pandora_lightning.world.demo import build_world

WARMUP = 3


class _StepClock(L.Callback):
    def __init__(self):
        self.ends: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.ends.append(time.perf_counter())


def _fresh_stage(recipe: RecipeConfig):
    L.seed_everything(recipe.seed, verbose=False)
    return STAGES[recipe.stage].from_recipe(recipe, resolve_vocabulary(recipe))


def _plain_loop(recipe: RecipeConfig, batches: list[dict]) -> list[float]:
    module = _fresh_stage(recipe).train()
    opt = module.configure_optimizers()
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    params = [p for p in module.parameters() if p.requires_grad]
    ends = []
    for batch in batches:
        loss = module.losses(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.trainer.gradient_clip_val)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return ends


def _lightning_loop(recipe: RecipeConfig, batches: list[dict], run_dir: Path) -> list[float]:
    module = _fresh_stage(recipe)
    clock = _StepClock()
    trainer = build_trainer(recipe, run_dir, callbacks=[clock], enable_checkpointing=False, max_steps=len(batches))
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return clock.ends


def _step_seconds(ends: list[float]) -> float:
    return statistics.median(b - a for a, b in zip(ends[WARMUP:], ends[WARMUP + 1 :]))


def run_bench(recipe_path: str, steps: int, out: Path, repeats: int = 2, parts: tuple[str, ...] = ("train", "data")) -> dict:
    result = _train_bench(recipe_path, steps, repeats) if "train" in parts else {}
    if "data" in parts:
        from pandora_lightning.bench.data import run_data_bench

        result["data"] = run_data_bench()
        _print_data(result["data"])
    if "precompute" in parts:
        from pandora_lightning.bench.precompute import run_precompute_bench

        result["precompute"] = run_precompute_bench(recipe_path)
    if "startup" in parts:
        from pandora_lightning.bench.startup import run_startup_bench

        result["startup"] = run_startup_bench()
    if "unet" in parts:
        from pandora_lightning.bench.unet import run_unet_bench

        result["unet"] = run_unet_bench(recipe_path)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _print_data(data: dict) -> None:
    print("\n=== bench: data loaders, samples/s (%s, batch %d) ===" % (data["example"], data["batch_size"]))
    print(f"{'workers':>8} {'shards':>10} {'files (usual)':>14} {'files (same decoder)':>21} {'shards/usual':>13} {'shards/same':>12}")
    for workers in (0, 2):
        f = data[f"workers_{workers}"]
        print(f"{workers:>8} {f['shards']:>10} {f['files_usual']:>14} {f['files_same_decoder']:>21} "
              f"{f['shards_over_files_usual']:>13} {f['shards_over_files_same_decoder']:>12}")
    b = data["build"]
    print(f"shards build: {b['clips']} clips from {b['videos']} videos ({b['source']}) in {b['seconds']} s "
          f"with {b['workers']} workers = {b['clips_per_s']} clips/s")


def _train_bench(recipe_path: str, steps: int, repeats: int) -> dict:
    build_world()
    recipe = load_recipe(recipe_path, ["init_from=null", "run_dir=runs/bench", "data.num_workers=0"])
    batches = list(islice(iter(train_loader(recipe, recipe.data.text_kind or STAGES[recipe.stage].text_kind)), steps + WARMUP + 1))
    plain, lightning = [], []
    for _ in range(repeats):
        plain.append(_step_seconds(_plain_loop(recipe, batches)))
        lightning.append(_step_seconds(_lightning_loop(recipe, batches, Path(recipe.run_dir))))
    plain_s, lightning_s = min(plain), min(lightning)
    batch = recipe.data.batch_size
    result = {
        "recipe": recipe_path,
        "steps_timed": steps,
        "batch_size": batch,
        "plain_step_s": round(plain_s, 4),
        "lightning_step_s": round(lightning_s, 4),
        "lightning_over_plain": round(lightning_s / plain_s, 3),
        "plain_samples_per_s": round(batch / plain_s, 2),
        "lightning_samples_per_s": round(batch / lightning_s, 2),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    print("\n=== bench: Lightning stage vs plain PyTorch loop (median step, best of %d) ===" % repeats)
    for key, value in result.items():
        print(f"{key:>24}: {value}")
    return result
