"""`pandora-lightning shards inspect`: what a shard set holds (`shards verify` is in verify.py).

Both take a manifest (`.yaml`), a folder of shards (every `*.tar` in it) or shard files/patterns.
`inspect` reads only the JSON of each sample (no video decoding) for counts, durations, domains and
text statistics, then decodes a few random samples into a contact sheet (one row per sample).
"""
from __future__ import annotations

import glob
import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np

from pandora_lightning.errors import PandoraError
from pandora_lightning.data.dataset import parse_meta, read_shards
from pandora_lightning.data.manifest import load_manifest
from pandora_lightning.data.tar import check_sources, is_command, printable
from pandora_lightning.data.video import contact_sheet, decode_mp4, save_png


def resolve_shards(sources: list[str], split: str | None = None, allow_commands: bool = False, with_counts: bool = False):
    """(url, set name) of every shard named by manifests, folders or file patterns; with `with_counts`,
    also {set name: samples} from the manifests. Sources that run commands need `allow_commands`."""
    shards: list[tuple[str, str]] = []
    counts: dict[str, int] = {}
    for source in sources:
        path = Path(source)
        if path.suffix in (".yaml", ".yml"):
            manifest = load_manifest(path, allow_commands=allow_commands)
            for shard_set in manifest.sets:
                if split is None or shard_set.split == split:
                    name = f"{shard_set.split}/{shard_set.domain}"
                    shards += [(u, name) for u in manifest.urls(shard_set)]
                    counts[name] = counts.get(name, 0) + shard_set.samples
        elif path.is_dir():
            shards += [(str(p), "") for p in sorted(path.glob("*.tar"))]
        elif is_command(source):
            check_sources([source], allow_commands, "shard source")
            shards.append((source, ""))
        else:
            shards += [(m, "") for m in sorted(glob.glob(source))]
    if not shards:
        raise PandoraError(f"no shards found in {' '.join(sources)}")
    return (shards, counts) if with_counts else shards


def inspect_shards(sources: list[str], split: str | None = None, sheet: str | Path | None = None,
                   sheet_samples: int = 8, sheet_frames: int = 8, seed: int = 0, allow_commands: bool = False) -> dict:
    """Counts, durations, domains and text statistics per (split, domain); a contact sheet of random samples."""
    rng = random.Random(seed)
    groups: dict[str, dict] = defaultdict(lambda: {"samples": 0, "seconds": 0.0, "actions": 0, "caption_words": 0,
                                                   "bytes": 0, "shards": set()})
    picked: list[dict] = []
    total = 0
    unreadable_json = []
    for url, set_name in resolve_shards(sources, split, allow_commands):
        for sample in read_shards([url], allow_commands):
            try:
                if "__error__" in sample:
                    raise ValueError(sample["__error__"])
                meta = parse_meta(sample.get("json"))
            except ValueError as err:
                unreadable_json.append((url, printable(sample["__key__"]), str(err)))
                continue
            name = f"{meta.get('split', '?')}/{meta.get('domain', '?')}" if not set_name else set_name
            g = groups[name]
            g["samples"] += 1
            g["shards"].add(url)
            g["bytes"] += len(sample.get("mp4", b"")) + len(sample["json"])
            fps = float(meta.get("fps") or 0)
            g["seconds"] += meta.get("num_frames", 0) / fps if fps else 0.0
            g["actions"] += len(meta.get("actions") or [])
            g["caption_words"] += len(str(meta.get("caption", "")).split())
            total += 1
            # reservoir sampling: every sample equally likely to reach the sheet
            if len(picked) < sheet_samples:
                picked.append(sample)
            elif rng.random() < sheet_samples / total:
                picked[rng.randrange(sheet_samples)] = sample
    table = {
        name: {
            "samples": g["samples"], "shards": len(g["shards"]), "hours": round(g["seconds"] / 3600, 4),
            "clip_s": round(g["seconds"] / g["samples"], 3), "actions_per_clip": round(g["actions"] / g["samples"], 2),
            "caption_words": round(g["caption_words"] / g["samples"], 1), "mb": round(g["bytes"] / 2**20, 3),
        }
        for name, g in sorted(groups.items())
    }
    report = {"samples": total, "sets": table, "unreadable": unreadable_json}
    if sheet and picked:
        report["sheet"], report["sheet_keys"] = str(sheet), _write_sheet(picked, Path(sheet), sheet_frames)
    return report


def _write_sheet(samples: list[dict], path: Path, frames: int) -> list[str]:
    rows, keys, size = [], [], None
    for sample in samples:
        try:
            clip = decode_mp4(sample["mp4"], size=size)
        except (KeyError, ValueError):
            continue
        size = size or clip.shape[1:3]
        rows.append(clip[np.linspace(0, len(clip) - 1, min(frames, len(clip))).round().astype(int)])
        keys.append(f"{sample['__url__']}:{sample['__key__']}")
    if rows:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(path, contact_sheet(rows, scale=max(1, 128 // max(size))))
    return keys


def format_table(report: dict) -> str:
    columns = ["samples", "shards", "hours", "clip_s", "actions_per_clip", "caption_words", "mb"]
    width = max([len("set")] + [len(n) for n in report["sets"]])
    lines = [f"{'set':<{width}}  " + "  ".join(f"{c:>16}" for c in columns)]
    for name, row in report["sets"].items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{row[c]:>16}" for c in columns))
    return "\n".join(lines)
