"""`score --compare BASE ADAPTER [ADAPTER ...]`: the base checkpoint and each adapter on it, scored on
the same held-out episodes with the same seed; one table (before/after per split and domain, the new
domain and the old ones) and one plot.

Writes compare.json, compare.md and compare.png to <base run>/scores/compare-<adapters> (or --out).
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from pandora_lightning.data.manifest import load_manifest
from pandora_lightning.evaluation.config import ScoreConfig
from pandora_lightning.evaluation.loop import load_episodes
from pandora_lightning.evaluation.report import SPLIT_COLOURS, _cell, _grid, _label, _ordered, _panel
from pandora_lightning.evaluation.score import default_out_dir, held_out_splits, score_split
from pandora_lightning.evaluation.suite import EpisodeMetrics, load_weights
from pandora_lightning.training.adapters import attach_adapters, resolve_adapter
from pandora_lightning.training.checkpoint import load_stage
from pandora_lightning.training.lora import use_adapter
from pandora_lightning.training.precision import autocast, resolve_device

BASE = "base"


def run_compare(cfg: ScoreConfig, adapters: list[str], plugins: Sequence[EpisodeMetrics] = ()) -> dict:
    """Score `cfg.checkpoint` alone and with each of `adapters` (NAME | PATH | NEWNAME=PATH)."""
    started = time.time()
    # As `score`: on --device, in --precision (default: the checkpoint's training precision), under its autocast.
    device = resolve_device(cfg.device)
    module = load_stage(cfg.checkpoint, device, cfg.precision)
    names = attach_adapters(module, cfg.checkpoint, adapters)
    model = module.model
    if cfg.num_inference_steps:
        model.generator.cfg.num_inference_steps = cfg.num_inference_steps
    manifest_path = cfg.manifest or module.recipe.data.manifest
    manifest = load_manifest(manifest_path, allow_commands=cfg.allow_commands)
    splits = held_out_splits(manifest, list(cfg.splits))
    episodes = {s: load_episodes(manifest, s, cfg.per_domain, model.cfg.generator.size) for s in splits}
    weights = load_weights(cfg)
    out_dir = Path(cfg.out) if cfg.out else default_out_dir(cfg.checkpoint).parent / f"compare-{'-'.join(names)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    variants: dict[str, dict] = {}
    for variant in (BASE, *names):
        use_adapter(model, None if variant == BASE else variant)
        variants[variant] = {}
        for split in splits:
            with autocast(module.recipe.trainer.precision, device):
                res = score_split(model, episodes[split], cfg, weights, None, split, plugins)
            variants[variant][split] = {"episodes": res["episodes"], "rounds": res["rounds"], "metrics": res["metrics"]}
    result = {
        "checkpoint": str(cfg.checkpoint),
        "adapters": {n: str(resolve_adapter(a, cfg.checkpoint)[1]) for n, a in zip(names, adapters)},
        "manifest": str(manifest_path),
        "seed": cfg.seed,
        "per_domain": cfg.per_domain,
        "variants": variants,
        "rows": rows(variants),
        "wall_seconds": round(time.time() - started, 1),
    }
    (out_dir / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "compare.md").write_text(markdown(result))
    plot(result, out_dir / "compare.png")
    return result | {"out_dir": str(out_dir)}


def rows(variants: dict[str, dict]) -> list[dict]:
    """One row per (metric, split, domain): the value of each variant, "all" first in each split."""
    base = variants[BASE]
    out = []
    metrics = _ordered({m: 0 for res in base.values() for m in res["metrics"]})
    for metric in metrics:
        for split, res in base.items():
            entry = res["metrics"].get(metric, {})
            for domain in ["all", *sorted(entry.get("per_domain", {}))]:
                values, cells = {}, {}
                for variant, by_split in variants.items():
                    got = by_split[split]["metrics"].get(metric, {})
                    values[variant] = got.get("overall") if domain == "all" else got.get("per_domain", {}).get(domain)
                    cells[variant] = _cell(got, None if domain == "all" else domain)
                out.append({"metric": metric, "split": split, "domain": domain, "values": values, "cells": cells})
    return out


def markdown(result: dict) -> str:
    names = [v for v in result["variants"] if v != BASE]
    lines = [
        f"# Before / after: {result['checkpoint']} with {', '.join(names)}",
        "",
        f"manifest {result['manifest']}, seed {result['seed']}, {result['per_domain'] or 'all'} episodes per domain "
        f"and split, the same episodes for every column; {result['wall_seconds']} s. Where a metric reports them: "
        f"value [95% bootstrap interval over episodes] (chance: the best text-ignoring, state-aware predictor)",
        "",
        "| metric | split | domain | base | " + " | ".join(f"{n} | Δ {n}" for n in names) + " |",
        "| --- | --- | --- | ---: |" + " ---: | ---: |" * len(names),
    ]
    for row in result["rows"]:
        base = row["values"][BASE]
        cells = [row["cells"][BASE]]
        for n in names:
            value = row["values"][n]
            cells += [row["cells"][n], "n/a" if value is None or base is None else f"{value - base:+.3f}"]
        domain = f"**{row['domain']}**" if row["domain"] == "all" else row["domain"]
        lines.append(f"| {_label(row['metric'])} | {row['split']} | {domain} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """A panel per metric: per split and domain, a bar for the base and one per adapter."""
    variants = list(result["variants"])
    colours = {v: SPLIT_COLOURS[i % len(SPLIT_COLOURS)] for i, v in enumerate(variants)}
    panels = []
    for metric in dict.fromkeys(r["metric"] for r in result["rows"]):
        bars, labels = [], []
        for row in (r for r in result["rows"] if r["metric"] == metric and r["domain"] != "all"):
            for i, variant in enumerate(variants):
                bars.append((variant, [row["values"][variant]], colours[variant]))
                labels.append(f"{row['split'][:5]}/{row['domain']}" if i == 0 else "")
        panels.append(_panel(f"{_label(metric, plain=True)}, before / after", bars, "bars", labels))
    _grid(panels, path, columns=2)


def print_compare(result: dict) -> None:
    print(markdown(result))
    print(f"wrote compare.json, compare.md and compare.png to {result['out_dir']}")
