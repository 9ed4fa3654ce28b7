"""`make bench`, data part: the shard loader against per-file loaders, and `shards build` throughput.

Clips: `clips` world episodes (14 frames, 32x32) encoded once with the dataset codec; the same
bytes go into WebDataset shards (4 shards for each of the 4 domains) and into a folder as
`{key}.mp4` + `{key}.json`.
Every loader makes the same examples (instruct "action" windows of 6 frames, batches of 8):
- shards: `ShardLoader`, the training loader;
- files (usual): a map-style Dataset that opens each file with PyAV, decodes every frame with
  `frame.to_ndarray(format="rgb24")` and PyAV's default threading, and cuts the window (what a
  read_video-style loader does), under DataLoader(shuffle=True);
- files (same decoder): the same Dataset decoding with this project's `decode_mp4` (only the
  window's frames, one thread, a cached converter), to tell the format from the decoder.
Samples per second over `batches` batches after the first one (worker start-up not counted), with
0 and 2 workers, best of `repeats` rounds in which the loaders take turns. The build figure cuts `build_clips` 64x64 source videos (yuv420p, as players
write them) to 32x32 clips with `shards build` in 2 processes.
"""
from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset

from pandora_lightning.data.config import DataConfig
from pandora_lightning.data.tools.build import BuildSettings, build_shards
from pandora_lightning.data.loader import training_loader
from pandora_lightning.data.manifest import load_manifest, write_manifest
from pandora_lightning.data.video import decode_mp4, encode_mp4, write_mp4
from pandora_lightning.world import WorldConfig, sample_episode

FRAMES, COND, BATCH = 6, 2, 8
SHARDS_PER_DOMAIN = 4  # so that 2 workers split the sets by shards


def _episodes(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    domains = WorldConfig().domains
    for i in range(n):
        domain = domains[i % len(domains)]
        yield f"{domain}-{i:06d}", sample_episode(WorldConfig(), domain, rng)


def write_corpus(root: Path, clips: int) -> tuple[Path, Path]:
    """The same encoded clips as shards (+ manifest) and as a folder of files."""
    folder, shards = root / "files", root / "shards"
    folder.mkdir(parents=True)
    shards.mkdir()
    writers, records = {}, {}
    for i, (key, ep) in enumerate(_episodes(clips)):
        meta = json.dumps({"caption": ep.caption, "actions": ep.actions, "domain": ep.domain, "num_frames": len(ep.frames), "fps": 8})
        mp4 = encode_mp4(ep.frames, 8)
        (folder / f"{key}.mp4").write_bytes(mp4)
        (folder / f"{key}.json").write_text(meta)
        shard = f"train-{ep.domain}-{i // 4 % SHARDS_PER_DOMAIN:06d}.tar"  # episodes cycle through the domains
        if shard not in writers:
            writers[shard] = wds.TarWriter(str(shards / shard), mtime=0)  # as `shards build` writes them
            records.setdefault(ep.domain, {"split": "train", "domain": ep.domain, "shards": [], "samples": 0})
            records[ep.domain]["shards"].append(shard)
        writers[shard].write({"__key__": key, "mp4": mp4, "json": meta.encode()})
        records[ep.domain]["samples"] += 1
    for writer in writers.values():
        writer.close()
    manifest = write_manifest(root / "manifest.yaml", "bench", shards, list(records.values()), written_by="bench")
    return folder, Path(manifest.path)


class FolderClips(Dataset):
    """The per-file baseline: one mp4 + one JSON file per clip."""

    def __init__(self, folder: Path, usual: bool):
        self.paths, self.usual = sorted(folder.glob("*.mp4")), usual

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path = self.paths[i]
        meta = json.loads(path.with_suffix(".json").read_text())
        span = random.Random(i).choice([a for a in meta["actions"] if a["end"] > COND])
        start = max(0, span["start"] - COND)
        if self.usual:
            with av.open(str(path)) as container:
                clip = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])[start : start + FRAMES]
        else:
            clip = decode_mp4(path.read_bytes(), num_frames=FRAMES, start=start)
        return {"frames": torch.from_numpy(np.ascontiguousarray(clip.transpose(0, 3, 1, 2))), "text": span["text"]}


def _samples_per_s(make_iter, batches: int) -> float:
    it = make_iter()
    next(it)  # worker start-up and the first batch are not timed
    started = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        assert batch["frames"].shape == (BATCH, FRAMES, 3, 32, 32)
    return round(batches * BATCH / (time.perf_counter() - started), 1)


def loader_figures(folder: Path, manifest: Path, workers: int, batches: int, repeats: int) -> dict:
    """Best of `repeats` rounds, the loaders taking turns within a round (the machine is shared)."""
    loaders = {
        "shards": lambda: training_loader(load_manifest(manifest), DataConfig(batch_size=BATCH, num_workers=workers),
                                          "action", FRAMES, COND, (32, 32), seed=0),
        **{
            name: lambda usual=usual: DataLoader(FolderClips(folder, usual), batch_size=BATCH, shuffle=True,
                                                 num_workers=workers, drop_last=True, generator=torch.Generator().manual_seed(0))
            for name, usual in (("files_usual", True), ("files_same_decoder", False))
        },
    }
    figures = {name: 0.0 for name in loaders}
    for _ in range(repeats):
        for name, make in loaders.items():
            loader = make()
            figures[name] = max(figures[name], _samples_per_s(lambda: iter(loader), batches))
    figures["shards_over_files_usual"] = round(figures["shards"] / figures["files_usual"], 2)
    figures["shards_over_files_same_decoder"] = round(figures["shards"] / figures["files_same_decoder"], 2)
    return figures


def build_figure(root: Path, clips: int, workers: int = 2) -> dict:
    videos = root / "videos"
    videos.mkdir()
    rows = []
    for key, ep in _episodes(clips, seed=1):
        write_mp4(videos / f"{key}.mp4", ep.frames, fps=8, scale=2)
        rows.append({"video": f"videos/{key}.mp4", "caption": ep.caption, "domain": ep.domain,
                     "actions": [{"text": a["text"], "start": a["start"] / 8, "end": a["end"] / 8} for a in ep.actions]})
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = BuildSettings(frames=14, fps=8, size=(32, 32), shard_bytes=2**20)
    summary = build_shards(root / "index.jsonl", root / "built", settings, workers=workers, progress=False)
    return {"videos": clips, "workers": workers, "clips": summary["clips_written"], "seconds": summary["seconds"],
            "clips_per_s": summary["clips_per_s"], "source": "64x64 yuv420p, 14 frames at 8 fps -> 32x32"}


def run_data_bench(clips: int = 512, batches: int = 56, build_clips: int = 200, repeats: int = 3) -> dict:
    with tempfile.TemporaryDirectory(prefix="pandora-data-bench-") as tmp:
        root = Path(tmp)
        folder, manifest = write_corpus(root, clips)
        result = {"clips": clips, "batch_size": BATCH, "batches_timed": batches, "best_of": repeats,
                  "example": "action window, 6 frames, 32x32"}
        for workers in (0, 2):
            result[f"workers_{workers}"] = loader_figures(folder, manifest, workers, batches, repeats)
        result["build"] = build_figure(root, build_clips)
    return result
