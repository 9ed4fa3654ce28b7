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

from pandora_lightning.data import tar
from pandora_lightning.data.manifest import Manifest
from pandora_lightning.data.tar import printable
from pandora_lightning.data.video import decode_mp4
from pandora_lightning.errors import PandoraError

log = logging.getLogger(__name__)
TEXT_KINDS = ("caption", "action")


class NoText(PandoraError):
    """A sound sample without the text the stage trains on (not corrupt: the data does not fit the stage)."""


MAX_FRAMES = 10**6  # a frame index or count beyond this is taken for a damaged number


def _whole(value, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_FRAMES:
        text = repr(value) if len(repr(value)) <= 30 else repr(value)[:27] + "..."
        raise ValueError(f"{what} is {text}, not a whole number in {low}..{MAX_FRAMES}")
    return value


def parse_meta(raw: bytes) -> dict:
    """A sample's JSON, checked: `caption` and `domain` text, `actions` a list of {text, start, end} in
    clip frames (0 <= start < end, end <= num_frames when given), `num_frames` and `fps` in range.
    Raises ValueError naming the first problem."""
    if not isinstance(raw, (bytes, bytearray)):
        raise ValueError("the JSON member is missing")
    try:
        meta = json.loads(raw)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"the JSON cannot be read ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"the JSON is a {type(meta).__name__}, not an object")
    for name in ("caption", "domain"):
        if not isinstance(meta.get(name, ""), str):
            raise ValueError(f"{name} is not text")
    frames = meta.get("num_frames")
    if frames is not None:
        _whole(frames, "num_frames", 1)
    fps = meta.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 1000):
        raise ValueError(f"fps is {fps!r}, not a frame rate")  # NaN fails the range check too
    actions = meta.get("actions", [])
    if not isinstance(actions, list):
        raise ValueError(f"actions is a {type(actions).__name__}, not a list")
    for i, action in enumerate(actions):
        if not isinstance(action, dict) or not isinstance(action.get("text"), str) or not action["text"].strip():
            raise ValueError(f"action {i} has no text")
        start, end = _whole(action.get("start"), f"action {i} start", 0), _whole(action.get("end"), f"action {i} end", 1)
        if end <= start:
            raise ValueError(f"action {i} ends (frame {end}) before it starts (frame {start})")
        if frames is not None and end > frames:
            raise ValueError(f"action {i} ends at frame {end}, after the clip's {frames} frames")
    return meta


@dataclass
class BadSampleCounter:
    """What a decoder saw: samples read, corrupt ones and sound ones without the stage's text.

    Corrupt samples are kept as (shard, key, reason) in `reports` for the training process, which
    counts each one once per run and applies the limit (`loader.ShardLoader`); `log_each` logs them
    here instead (outside training).
    """

    seen: int = 0
    bad: int = 0
    no_text: int = 0
    reports: list[tuple[str, str, str]] = field(default_factory=list)
    no_text_example: str = ""
    log_each: bool = False

    def skip(self, url: str, key: str, reason: str) -> None:
        self.bad += 1
        self.reports.append((url, key, reason))
        if self.log_each:
            log.warning("skipping corrupt sample %s:%s: %s", url, printable(key), reason)


def bad_limit_reached(bad: int, seen: int, max_fraction: float, min_bad: int) -> bool:
    """The limit of `data.max_bad_fraction` / `data.min_bad_samples` (see DataConfig): `bad` distinct
    corrupt samples among `seen` read (the caller caps `seen` at one epoch's worth)."""
    return bad >= min_bad and bad > max_fraction * seen


class ExampleDecoder:
    """Raw shard sample -> {"frames": (T, 3, H, W) uint8, "text", "teacher_text", "domain", "key"}, or None (counted).

    Only the frames of the window are converted (the clip is decoded once, up to the window's end),
    scaled to `size=(H, W)` when the clip has another size. Anything wrong with the sample's bytes
    is a corrupt sample; a sound sample without the stage's text kind is counted apart (`no_text`).
    With `rounds` > 1 an "action" example is a multi-round window: `cond_frames` given frames, then
    `rounds` rounds of `frames - cond_frames` new frames, and "text" / "teacher_text" are lists with
    one text per round (the action under way at the round's first new frame, "" for none).
    "teacher_text" is what the generator's own text encoder reads: an action's "resolved_text" when
    it has one (an action such as "again" stands for an earlier one), else its text.
    """

    def __init__(
        self, kind: str, frames: int, cond_frames: int, counter: BadSampleCounter | None = None,
        size: tuple[int, int] | None = None, rounds: int = 1, open_on_reference: bool = False, recolor: float = 0.0,
        recolor_avoid: tuple = (), recolor_avoid_radius: float = 100.0,
    ):
        if kind not in TEXT_KINDS:
            raise ValueError(f"text kind '{kind}' is unknown; use one of {TEXT_KINDS}")
        if rounds < 1 or (rounds > 1 and kind != "action"):
            raise ValueError(f"data.rounds={rounds}: multi-round windows need action texts (and rounds >= 1)")
        check_recolor(recolor, kind)
        self.kind, self.frames, self.cond_frames, self.size, self.rounds = kind, frames, cond_frames, size, rounds
        self.open_on_reference, self.recolor = open_on_reference, recolor
        self.recolor_avoid, self.recolor_avoid_radius = recolor_avoid, recolor_avoid_radius
        self.counter = counter if counter is not None else BadSampleCounter(log_each=True)

    @property
    def window_frames(self) -> int:
        return self.frames + (self.rounds - 1) * (self.frames - self.cond_frames)

    def window(self, meta: dict, rng: random.Random) -> tuple[int, str | list[str], str | list[str]]:
        if self.kind == "caption":
            if not meta.get("caption", "").strip():
                raise NoText("it has no caption")
            return 0, meta["caption"], meta["caption"]
        spans = [a for a in meta.get("actions", []) if a["end"] > self.cond_frames]
        if not spans:
            raise NoText("it has no action text" if not meta.get("actions") else
                         f"none of its actions runs past the first {self.cond_frames} frames")
        if self.rounds == 1:
            span = rng.choice(spans)
            return max(0, span["start"] - self.cond_frames), span["text"], span.get("resolved_text", span["text"])
        # A window opens on an action that does not refer to one before the window, unless open_on_reference.
        first = [a for a in spans[: max(1, len(spans) - self.rounds + 1)] if self.open_on_reference or not a.get("refers")]
        first = first or spans[:1]
        start = max(0, rng.choice(first)["start"] - self.cond_frames)
        texts, teacher = [], []
        for r in range(self.rounds):
            frame = start + self.cond_frames + r * (self.frames - self.cond_frames)
            span = next((a for a in meta["actions"] if a["start"] <= frame < a["end"]), None)
            texts.append(span["text"] if span else "")
            teacher.append(span.get("resolved_text", span["text"]) if span else "")
        return start, texts, teacher

    def __call__(self, sample: dict, rng: random.Random | None = None) -> dict | None:
        """`rng` picks the action; pass a seeded one for a reproducible stream."""
        url, key = str(sample.get("__url__", "?")), str(sample.get("__key__", "?"))
        self.counter.seen += 1
        try:
            if "__error__" in sample:
                raise ValueError(sample["__error__"])
            meta = parse_meta(sample.get("json"))
            rng = rng or random
            start, text, teacher = self.window(meta, rng)
            out = self.payload(sample, start, teacher)
            if self.recolor and rng.random() < self.recolor:
                out["frames"] = recolor(out["frames"], rng, self.recolor_avoid, self.recolor_avoid_radius)
        except NoText as err:
            self.counter.no_text += 1
            self.counter.no_text_example = self.counter.no_text_example or f"{url}:{printable(key)} ({err})"
            return None
        except PandoraError:
            raise
        except Exception as err:  # noqa: BLE001 - a sample's bytes are untrusted: whatever they break is a corrupt sample
            self.counter.skip(url, key, f"{type(err).__name__}: {err}")
            return None
        return {**out, "text": text, "teacher_text": teacher, "domain": meta.get("domain", ""), "key": key}

    def payload(self, sample: dict, start: int, teacher) -> dict:
        """The window's tensors (here its frames); raising ValueError marks the sample corrupt."""
        return {"frames": self.frames_at(sample, start, self.window_frames)}

    def frames_at(self, sample: dict, start: int, need: int) -> torch.Tensor:
        """`need` frames of the sample's mp4 from `start`, (T, 3, H, W) uint8 at the decoder's size."""
        if not isinstance(sample.get("mp4"), (bytes, bytearray)):
            raise ValueError("the mp4 member is missing")
        clip = decode_mp4(sample["mp4"], num_frames=need, start=start, size=self.size)
        if len(clip) < need:
            raise ValueError(f"clip has {start + len(clip)} frames, the window needs {start + need}")
        return torch.from_numpy(np.ascontiguousarray(clip.transpose(0, 3, 1, 2)))


def check_recolor(share: float, kind: str) -> None:
    """`data.recolor` (a share, checked by DataConfig) only with action texts: a caption names the
    colours it would change."""
    if share and kind != "action":
        raise ValueError(f"data.recolor={share} recolours clips whose {kind} texts name their colours; "
                         f"use it with action texts (data.text_kind=action, the instruct stage) or set data.recolor=0")


def recolor(frames: torch.Tensor, rng: random.Random, avoid: tuple = (), radius: float = 100.0) -> torch.Tensor:
    """A clip (T, 3, H, W) uint8 in other colours: its RGB channels in a random order, each inverted
    with probability 1/2 (48 recolourings, the identity among them), the same for every frame.
    Shapes, positions, motion and every distance between colours are untouched, and which colour is
    object and which background changes (a dark object on a light background, say), so an action is
    learnt as what it does to the object whatever its colours (README, "The demo model", "Transfer").
    A recolouring that gives the clip's first frame a mean colour within `radius` of a colour in
    `avoid` is drawn again (up to 64 draws, then the clip is left as it is)."""
    mean = frames[0].flatten(1).double().mean(dim=1)
    avoid_t = torch.tensor(avoid, dtype=torch.float64).view(-1, 3)
    for _ in range(64):
        order = rng.sample(range(3), 3)
        flips = [rng.random() < 0.5 for _ in range(3)]
        flip = torch.tensor(flips)
        colour = torch.where(flip, 255 - mean[order], mean[order])
        if len(avoid_t) and bool((torch.linalg.vector_norm(avoid_t - colour, dim=1) <= radius).any()):
            continue
        out = frames[:, order]
        return torch.where(flip.view(1, 3, 1, 1), 255 - out, out)
    return frames


def collate(examples: list[dict]) -> dict:
    """Examples -> {"frames": (B, T, 3, H, W) uint8, "text": [B], "teacher_text": [B], "domain": [B], "key": [B]};
    precomputed examples bring "encoded" ({name: (B, ...)}) and "frames" only when the generator reads pixels."""
    batch = {k: [e[k] for e in examples] for k in ("text", "teacher_text", "domain", "key")}
    if "frames" in examples[0]:
        batch["frames"] = torch.stack([e["frames"] for e in examples])
    if "encoded" in examples[0]:
        batch["encoded"] = {k: torch.stack([e["encoded"][k] for e in examples]) for k in examples[0]["encoded"]}
    return batch


def read_shards(urls: Iterable[str], allow_commands: bool = False) -> Iterator[dict]:
    """Raw samples ({"__key__", "__url__", "mp4", "json", ...}) of the shards in order; nothing decoded.
    A damaged part of a shard comes as a sample with "__error__" (see `tar.read_shard`)."""
    return tar.read_shards(urls, allow_commands)


def iterate_split(
    manifest: Manifest, split: str, per_domain: int | None = None, skipped: list[tuple[str, str]] | None = None
) -> Iterator[tuple[str, np.ndarray, dict]]:
    """A split's samples in manifest order, at most `per_domain` of each domain: (key, frames
    (T, H, W, 3) uint8, meta). Samples past a domain's limit are not decoded. A corrupt sample is
    skipped, logged and appended to `skipped` as ("shard:key", reason)."""
    seen: Counter[str] = Counter()
    for shard_set in manifest.sets_for(split):
        for sample in read_shards(manifest.urls(shard_set), manifest.allow_commands):
            where = f"{sample['__url__']}:{printable(sample['__key__'])}"
            try:
                if "__error__" in sample:
                    raise ValueError(sample["__error__"])
                meta = parse_meta(sample.get("json"))
                domain = meta.get("domain", "")
                if per_domain is not None and seen[domain] >= per_domain:
                    continue
                frames = decode_mp4(sample["mp4"])
            except Exception as err:  # noqa: BLE001 - untrusted bytes: anything they break is a corrupt sample
                reason = f"{type(err).__name__}: {err}"
                log.warning("skipping corrupt sample %s: %s", where, reason)
                if skipped is not None:
                    skipped.append((where, reason))
                continue
            seen[domain] += 1
            yield sample["__key__"], frames, meta


def split_texts(manifest: Manifest, split: str) -> list[str]:
    """Every caption and action text of a split, read from the samples' JSON (no video decoded);
    samples whose JSON cannot be used are left out (training skips and counts them)."""
    texts: list[str] = []
    for shard_set in manifest.sets_for(split):
        for sample in read_shards(manifest.urls(shard_set), manifest.allow_commands):
            try:
                meta = parse_meta(sample.get("json")) if "__error__" not in sample else {}
            except ValueError:
                continue
            texts += [meta["caption"]] if meta.get("caption") else []
            texts += [a[k] for a in meta.get("actions", []) for k in ("text", "resolved_text") if a.get(k)]
    return texts


def check_text_kind(manifest: Manifest, split: str, kind: str, cond_frames: int, per_set: int = 32) -> None:
    """Before training: the first `per_set` sound samples of each set of `split` must include some with
    the text kind the stage trains on; a set with none stops with one line that says so (how many
    clips, which text kind, the recipe key). A set with only some logs a warning."""
    decoder = ExampleDecoder(kind, 1, cond_frames, BadSampleCounter())
    for shard_set in manifest.sets_for(split):
        checked = usable = 0
        has_other = False
        for sample in read_shards(manifest.urls(shard_set), manifest.allow_commands):
            try:
                meta = parse_meta(sample.get("json")) if "__error__" not in sample else None
            except ValueError:
                meta = None
            if meta is None:
                continue  # corrupt: counted by training, listed by `shards verify`
            checked += 1
            try:
                decoder.window(meta, random.Random(0))
                usable += 1
            except NoText:
                has_other = has_other or bool(meta.get("caption" if kind == "action" else "actions"))
            if checked >= per_set:
                break
        name = f"set '{shard_set.split}/{shard_set.domain}' of {manifest.path}"
        other = "caption" if kind == "action" else "action"
        if checked and not usable:
            hint = (f"they have {other} texts: set data.text_kind={other} to train on those, or " if has_other else "")
            raise PandoraError(
                f"none of the first {checked} clips of {name} has {'an' if kind == 'action' else 'a'} {kind} text, "
                f"and this stage trains on {kind} texts (data.text_kind={kind}); {hint}give the clips {kind} texts "
                f"(`shards build` index column '{'actions' if kind == 'action' else 'caption'}') or leave the set out"
            )
        if usable < checked:
            log.warning("%s: %d of the first %d clips have no %s text (data.text_kind=%s); training skips them",
                        name, checked - usable, checked, kind, kind)
