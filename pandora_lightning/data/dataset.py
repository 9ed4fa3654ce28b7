"""WebDataset streams of world-model training examples.

A shard sample is an mp4 clip plus JSON (caption, actions with frame spans, domain). A training
example is a window of `frames` frames whose first `cond_frames` are given:
- "caption" examples (align) start at frame 0 and carry the clip's caption;
- "action" examples (instruct) end the given frames where a random action's span starts and carry
  that action's text.
"""
from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds

from pandora_lightning.data.manifest import Manifest
from pandora_lightning.data.video import decode_mp4

log = logging.getLogger(__name__)
TEXT_KINDS = ("caption", "action")


class TooManyBadSamples(RuntimeError):
    pass


@dataclass
class BadSampleCounter:
    """Skips and counts corrupt samples; stops the run once they exceed `max_fraction`."""

    max_fraction: float = 0.05
    seen: int = 0
    bad: int = 0

    def skip(self, where: str, reason: str) -> None:
        self.bad += 1
        log.warning("skipping corrupt sample %s: %s (%d bad of %d so far)", where, reason, self.bad, self.seen)
        if self.bad > max(8, self.max_fraction * self.seen):
            raise TooManyBadSamples(
                f"{self.bad} of {self.seen} samples were corrupt (limit {self.max_fraction:.0%}, data.max_bad_fraction); "
                f"last one: {where}: {reason}. Check the shards with `pandora-lightning shards verify` or raise the limit."
            )

    def tar_handler(self, exn: Exception) -> bool:
        self.skip("(tar stream)", repr(exn))
        return True  # keep going


class ExampleDecoder:
    """Raw shard sample -> {"frames": (T, 3, H, W) uint8, "text": str, "domain": str}, or None if corrupt."""

    def __init__(self, kind: str, frames: int, cond_frames: int, counter: BadSampleCounter):
        if kind not in TEXT_KINDS:
            raise ValueError(f"text kind '{kind}' is unknown; use one of {TEXT_KINDS}")
        self.kind, self.frames, self.cond_frames, self.counter = kind, frames, cond_frames, counter

    def window(self, meta: dict) -> tuple[int, str]:
        if self.kind == "caption":
            return 0, meta["caption"]
        spans = [a for a in meta["actions"] if a["start"] >= self.cond_frames]
        if not spans:
            raise ValueError(f"no action starts after the first {self.cond_frames} frames")
        span = random.choice(spans)
        return span["start"] - self.cond_frames, span["text"]

    def __call__(self, sample: dict) -> dict | None:
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        self.counter.seen += 1
        try:
            meta = json.loads(sample["json"])
            start, text = self.window(meta)
            clip = decode_mp4(sample["mp4"], num_frames=start + self.frames)
            if len(clip) < start + self.frames:
                raise ValueError(f"clip has {len(clip)} frames, the window needs {start + self.frames}")
        except TooManyBadSamples:
            raise
        except (KeyError, ValueError, TypeError) as err:
            self.counter.skip(where, f"{type(err).__name__}: {err}")
            return None
        window = np.ascontiguousarray(clip[start : start + self.frames].transpose(0, 3, 1, 2))
        return {"frames": torch.from_numpy(window), "text": text, "domain": meta.get("domain", "")}


def training_stream(
    manifest: Manifest, split: str, decoder: ExampleDecoder, shuffle_buffer: int, seed: int
) -> wds.DataPipeline | wds.RandomMix:
    """An endless stream mixing the split's shard sets by their weights.

    Shards are resampled with a seed that also depends on the rank and dataloader worker, so
    every process reads its own random sequence of shards.
    """
    streams, weights = [], []
    for shard_set in manifest.sets_for(split):
        streams.append(
            wds.DataPipeline(
                wds.ResampledShards(manifest.urls(shard_set), seed=seed, deterministic=True),
                wds.tarfile_to_samples(handler=decoder.counter.tar_handler),
                wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 32)),
                wds.map(decoder),
                wds.select(lambda x: x is not None),
            )
        )
        weights.append(shard_set.weight)
    return streams[0] if len(streams) == 1 else wds.RandomMix(streams, weights)


def iterate_split(manifest: Manifest, split: str, per_domain: int | None = None):
    """A split's raw samples in manifest order, at most `per_domain` of each domain:
    (key, frames (T, H, W, 3) uint8, meta). Samples past a domain's limit are not decoded."""
    seen: Counter[str] = Counter()
    for shard_set in manifest.sets_for(split):
        for sample in wds.WebDataset(manifest.urls(shard_set), shardshuffle=False, empty_check=False):
            meta = json.loads(sample["json"])
            seen[meta.get("domain", "")] += 1
            if per_domain is None or seen[meta.get("domain", "")] <= per_domain:
                yield sample["__key__"], decode_mp4(sample["mp4"]), meta
