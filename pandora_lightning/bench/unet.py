"""`pandora-lightning bench --only unet`: a training step of the tiny generator's two UNets on the same clips.

The recipe's generator (the demo's: the 2d UNet, frames stacked as channels, at `[64, 128]`) against
the spatio-temporal UNet at the same widths and at `[32, 64]`, the demo's before: forward, backward
and an AdamW step at the recipe's batch size on random clips, seconds a step (median after a warm-up,
this machine's threads). What the demo's quality per step is worth is in docs/demo-model.md.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from pandora_lightning.models.generator import build_generator
from pandora_lightning.recipe import load_recipe

WARMUP = 2


def _step_seconds(cfg, frames: torch.Tensor, context: torch.Tensor, steps: int) -> tuple[float, int]:
    torch.manual_seed(0)
    gen = build_generator(cfg).train()
    optimizer = torch.optim.AdamW(gen.parameters(), lr=1e-3)
    times = []
    for _ in range(WARMUP + steps):
        start = time.perf_counter()
        pred, target = gen(frames, context)
        torch.nn.functional.mse_loss(pred, target).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return statistics.median(times[WARMUP:]), sum(p.numel() for p in gen.parameters())


def run_unet_bench(recipe_path: str, steps: int = 5) -> dict:
    recipe = load_recipe(recipe_path, ["init_from=null"])
    cfg, batch = recipe.model.generator, recipe.data.batch_size
    widths = list(cfg.block_out_channels)
    variants = {
        f"{cfg.unet} {widths} (recipe)": cfg,
        f"spatiotemporal {widths}": replace(cfg, unet="spatiotemporal"),
        "spatiotemporal [32, 64]": replace(cfg, unet="spatiotemporal", block_out_channels=[32, 64]),
    }
    gen = torch.Generator().manual_seed(0)
    frames = torch.rand(batch, cfg.frames, 3, *cfg.size, generator=gen) * 2 - 1
    context = torch.randn(batch, 8, cfg.cross_attention_dim, generator=gen)
    result = {"recipe": recipe_path, "batch_size": batch, "threads": torch.get_num_threads(), "steps": {}}
    for name, variant in variants.items():
        seconds, params = _step_seconds(variant, frames, context, steps)
        result["steps"][name] = {"seconds": round(seconds, 4), "parameters": params}
    print(f"\n=== bench: a tiny generator training step, batch {batch}, {result['threads']} threads ===")
    base = result["steps"][f"{cfg.unet} {widths} (recipe)"]["seconds"]
    for name, row in result["steps"].items():
        print(f"{name:>34}: {row['seconds']:.3f} s a step, {row['parameters']:,} parameters, {row['seconds'] / base:.2f}x the recipe's")
    return result
