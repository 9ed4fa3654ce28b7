"""Shard samples -> world-model training examples, with corrupt samples skipped and counted.

A shard sample is an mp4 clip plus JSON (caption, actions with frame spans, domain). A training
example is a window of `frames` frames whose first `cond_frames` are given:
- "caption" examples (align) start at frame 0 and carry the clip's caption;
- "action" examples (instruct) carry a random action's text; the given frames end where the action
  starts (or the window starts at frame 0 for an action already under way there), so the new
  frames show the action.

The streams that feed training (split across nodes and workers, mixed, resumable) are in
`stream.py`; this file holds what one sample needs.
"""
from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import webdataset as wds

from pandora_lightning.data.manifest import Manifest
from pandora_lightning.data.video import decode_mp4
from pandora_lightning.errors import PandoraError

log = logging.getLogger(__name__)
TEXT_KINDS = ("caption", "action")


class TooManyBadSamples(PandoraError):
    """More corrupt samples than `data.max_bad_fraction` allows."""


@dataclass
class BadSampleCounter:
    """Skips and counts corrupt samples; stops the run once they exceed `max_fraction`.

    `quiet` counters (inside data-loader workers) keep the reports in `reports` instead of logging
    them, so the training process logs them where its log handlers are.
    """

    max_fraction: float = 0.05
    seen: int = 0
    bad: int = 0
    quiet: bool = False
    reports: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, where: str, reason: str) -> None:
        self.bad += 1
        if self.quiet:
            self.reports.append((where, reason))
        else:
            log.warning("skipping corrupt sample %s: %s (%d bad of %d so far)", where, reason, self.bad, self.seen)
        check_bad_fraction(self.bad, self.seen, self.max_fraction, f"{where}: {reason}")

    def tar_handler(self, exn: Exception) -> bool:
        """webdataset handler for a shard that cannot be read (truncated tar, missing URL, ...)."""
        # webdataset appends (stream, url) to the exception's args
        url = exn.args[-1] if len(exn.args) > 1 and isinstance(exn.args[-1], str) else "(tar stream)"
        self.seen += 1
        self.skip(f"{url}:(rest of shard)", f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return True  # keep going with the next shard


def check_bad_fraction(bad: int, seen: int, max_fraction: float, last: str) -> None:
    # A floor of 8 so that one bad sample among the first few does not stop a run.
    if bad > max(8, max_fraction * seen):
        raise TooManyBadSamples(
            f"{bad} of {seen} samples were corrupt (limit {max_fraction:.0%}, data.max_bad_fraction); "
            f"last one: {last}. Check the shards with `pandora-lightning shards verify` or raise the limit."
        )


class ExampleDecoder:
    """Raw shard sample -> {"frames": (T, 3, H, W) uint8, "text", "domain", "key"}, or None if corrupt.

    Only the frames of the window are converted (the clip is decoded once, up to the window's end),
    scaled to `size=(H, W)` when the clip has another size.
    """

    def __init__(
        self, kind: str, frames: int, cond_frames: int, counter: BadSampleCounter, size: tuple[int, int] | None = None
    ):
        if kind not in TEXT_KINDS:
            raise ValueError(f"text kind '{kind}' is unknown; use one of {TEXT_KINDS}")
        self.kind, self.frames, self.cond_frames, self.counter, self.size = kind, frames, cond_frames, counter, size

    def window(self, meta: dict, rng: random.Random) -> tuple[int, str]:
        if self.kind == "caption":
            if not isinstance(meta["caption"], str) or not meta["caption"]:
                raise ValueError("the caption is empty")
            return 0, meta["caption"]
        spans = [a for a in meta["actions"] if a["end"] > self.cond_frames]
        if not spans:
            raise ValueError(f"no action runs past the first {self.cond_frames} frames")
        span = rng.choice(spans)
        return max(0, span["start"] - self.cond_frames), span["text"]

    def __call__(self, sample: dict, rng: random.Random | None = None) -> dict | None:
        """`rng` picks the action; pass a seeded one for a reproducible stream."""
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        self.counter.seen += 1
        try:
            meta = json.loads(sample["json"])
            start, text = self.window(meta, rng or random)
            clip = decode_mp4(sample["mp4"], num_frames=self.frames, start=start, size=self.size)
            if len(clip) < self.frames:
                raise ValueError(f"clip has {start + len(clip)} frames, the window needs {start + self.frames}")
        except TooManyBadSamples:
            raise
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            self.counter.skip(where, f"{type(err).__name__}: {err}")
            return None
        window = np.ascontiguousarray(clip.transpose(0, 3, 1, 2))
        return {"frames": torch.from_numpy(window), "text": text, "domain": meta.get("domain", ""), "key": sample["__key__"]}


def collate(examples: list[dict]) -> dict:
    """Examples -> {"frames": (B, T, 3, H, W) uint8, "text": [B], "domain": [B], "key": [B]}."""
    return {
        "frames": torch.stack([e["frames"] for e in examples]),
        "text": [e["text"] for e in examples],
        "domain": [e["domain"] for e in examples],
        "key": [e["key"] for e in examples],
    }


def read_shards(urls: Iterable[str], handler) -> Iterator[dict]:
    """Raw samples ({"__key__", "__url__", "mp4", "json", ...}) of the shards in order; nothing decoded.

    Opens local files and anything webdataset's gopen opens (http, pipe:, ...); a shard that
    cannot be read is reported to `handler` and the stream goes on with the next one.
    """
    return wds.tarfile_to_samples(handler=handler)({"url": url} for url in urls)


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


def split_texts(manifest: Manifest, split: str) -> list[str]:
    """Every caption and action text of a split, read from the samples' JSON (no video decoded)."""
    texts: list[str] = []
    for shard_set in manifest.sets_for(split):
        for sample in read_shards(manifest.urls(shard_set), wds.reraise_exception):
            meta = json.loads(sample["json"])
            texts += [meta["caption"]] if meta.get("caption") else []
            texts += [a["text"] for a in meta.get("actions", []) if a.get("text")]
    return texts
