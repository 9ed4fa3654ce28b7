"""`pandora-lightning shards inspect` and `shards verify`: what a shard set holds, and whether all of it decodes.

Both take a manifest (`.yaml`), a folder of shards (every `*.tar` in it) or shard files/patterns.
`inspect` reads only the JSON of each sample (no video decoding) for counts, durations, domains and
text statistics, then decodes a few random samples into a contact sheet (one row per sample).
`verify` decodes every sample, checks its JSON and frames, and lists each corrupt one with its
shard and key; shards are verified in parallel worker processes.
"""
from __future__ import annotations

import glob
import json
import multiprocessing
import random
from collections import defaultdict
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pandora_lightning.errors import PandoraError
from pandora_lightning.data.dataset import read_shards
from pandora_lightning.data.manifest import load_manifest
from pandora_lightning.data.video import contact_sheet, decode_mp4, save_png


def resolve_shards(sources: list[str], split: str | None = None) -> list[tuple[str, str]]:
    """(url, set name) of every shard named by manifests, folders or file patterns."""
    shards: list[tuple[str, str]] = []
    for source in sources:
        path = Path(source)
        if path.suffix in (".yaml", ".yml"):
            manifest = load_manifest(path)
            for shard_set in manifest.sets:
                if split is None or shard_set.split == split:
                    shards += [(u, f"{shard_set.split}/{shard_set.domain}") for u in manifest.urls(shard_set)]
        elif path.is_dir():
            shards += [(str(p), "") for p in sorted(path.glob("*.tar"))]
        else:
            matches = sorted(glob.glob(source)) or ([source] if "://" in source or source.startswith("pipe:") else [])
            shards += [(m, "") for m in matches]
    if not shards:
        raise PandoraError(f"no shards found in {' '.join(sources)}")
    return shards


class _Errors:
    """webdataset handler that records unreadable parts of the shard being read instead of raising."""

    def __init__(self):
        self.items: list[tuple[str, str, str]] = []
        self.url = "?"

    def __call__(self, exn: Exception) -> bool:
        self.items.append((self.url, "(rest of shard)", f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"))
        return True


def _meta(sample: dict) -> dict:
    meta = json.loads(sample["json"])
    if not isinstance(meta, dict):
        raise ValueError("the JSON is not an object")
    return meta


def inspect_shards(sources: list[str], split: str | None = None, sheet: str | Path | None = None,
                   sheet_samples: int = 8, sheet_frames: int = 8, seed: int = 0) -> dict:
    """Counts, durations, domains and text statistics per (split, domain); a contact sheet of random samples."""
    rng = random.Random(seed)
    errors = _Errors()
    groups: dict[str, dict] = defaultdict(lambda: {"samples": 0, "seconds": 0.0, "actions": 0, "caption_words": 0,
                                                   "bytes": 0, "shards": set()})
    picked: list[dict] = []
    total = 0
    unreadable_json = []
    for url, set_name in resolve_shards(sources, split):
        errors.url = url
        for sample in read_shards([url], errors):
            try:
                meta = _meta(sample)
            except (KeyError, ValueError) as err:
                unreadable_json.append((url, sample.get("__key__", "?"), f"{type(err).__name__}: {err}"))
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
    report = {"samples": total, "sets": table, "unreadable": [*errors.items, *unreadable_json]}
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


def _check_sample(sample: dict, min_frames: int) -> str | None:
    """Why the sample is corrupt, or None."""
    try:
        meta = _meta(sample)
        if not isinstance(meta.get("caption", ""), str):
            raise ValueError("caption is not text")
        clip = decode_mp4(sample["mp4"])
        count = meta.get("num_frames", len(clip))
        if len(clip) != count:
            raise ValueError(f"the clip has {len(clip)} frames, its JSON says {count}")
        if len(clip) < min_frames:
            raise ValueError(f"the clip has {len(clip)} frames, fewer than {min_frames}")
        for a in meta.get("actions") or []:
            if not isinstance(a.get("text"), str) or not 0 <= a["start"] < a["end"] <= len(clip):
                raise ValueError(f"action {a} does not fit the clip's {len(clip)} frames")
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _verify_shard(url: str, min_frames: int) -> tuple[str, int, list[tuple[str, str, str]]]:
    errors = _Errors()
    errors.url = url
    samples, bad = 0, []
    for sample in read_shards([url], errors):
        samples += 1
        reason = _check_sample(sample, min_frames)
        if reason:
            bad.append((url, sample.get("__key__", "?"), reason))
    return url, samples, [*errors.items, *bad]


def verify_shards(sources: list[str], split: str | None = None, min_frames: int = 1, workers: int = 1,
                  progress: bool = True) -> dict:
    """Decode every sample; {"shards", "samples", "corrupt": [(shard, key, why)]}."""
    urls = [u for u, _ in resolve_shards(sources, split)]
    check = partial(_verify_shard, min_frames=min_frames)
    samples, corrupt = 0, []
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(check, urls) if pool else map(check, urls)
        for _, count, bad in tqdm(results, total=len(urls), unit="shard", desc="shards verify", disable=not progress):
            samples += count
            corrupt += bad
    finally:
        if pool is not None:
            pool.terminate()
    return {"shards": len(urls), "samples": samples, "corrupt": corrupt}


def format_table(report: dict) -> str:
    columns = ["samples", "shards", "hours", "clip_s", "actions_per_clip", "caption_words", "mb"]
    width = max([len("set")] + [len(n) for n in report["sets"]])
    lines = [f"{'set':<{width}}  " + "  ".join(f"{c:>16}" for c in columns)]
    for name, row in report["sets"].items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{row[c]:>16}" for c in columns))
    return "\n".join(lines)
