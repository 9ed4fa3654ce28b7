"""Deterministic training streams over a manifest split: split across nodes and workers, mixed by
weight, shuffled with seeds, and resumable at any batch.

Readers. A job reads with `world_size` ranks x `W` data-loader workers (W = max(1, num_workers)).
Each reader is a *slot* `rank * W + worker`, and every slot reads its own part of every shard set:
- a set with at least as many shards as slots is split by shards: slot k reads shards k, k+n, ...
  of the pass's shard order (the WebDataset way; the one that scales);
- a set with fewer shards than slots is split by samples: every slot reads all of the set's shards
  and keeps samples k, k+n, ... (more reading, never more decoding).
A *pass* over a set is one such read. Its shard order is permuted by (seed, epoch, set, pass), the
same on every slot, so within a pass the slots' parts are disjoint and together cover the set. A
slot that has read its part goes on with the next pass.

Mixing. An epoch is `epoch_samples` samples over the whole job (default: the split's sample count).
Each slot takes its share of them as a random order of a fixed multiset in which set i appears
round(weight_i x share) times (largest remainders): the domain fractions match the weights exactly,
not just on average, and when the weights are proportional to the set sizes (as `shards build` and
`shards world` write them) and the shards split evenly, every sample is read exactly once an epoch
across the whole job. An upweighted small set is re-read in later passes (resampling); a
downweighted one is partly read, and the next epoch starts all passes afresh with new seeds. Draws
that replace corrupt samples start a new block of the same mix. Within a pass, samples are shuffled
in a buffer of `shuffle_buffer / number of sets` raw samples (compressed bytes, not frames), so a
worker holds about `shuffle_buffer` raw samples however many sets it mixes.

Determinism and resume. Every random choice is a function of (seed, epoch, slot, position): the set
of each draw, the shard order, the shuffle buffer, the action window. A slot's stream is therefore
fixed, and its state after a batch is one number: the raw draws it took in this epoch. To resume, a
slot replays its stream up to that draw without decoding (it reads tar bytes; decoding is the cost)
and goes on. `loader.ShardLoader` keeps that number per slot from the batches it delivers.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from pandora_lightning.data.dataset import BadSampleCounter, ExampleDecoder, collate, read_shards
from pandora_lightning.data.encoded import EncodedExampleDecoder
from pandora_lightning.data.tar import printable
from pandora_lightning.errors import PandoraError


@dataclass(frozen=True)
class SetSpec:
    name: str  # "split/domain", for messages
    urls: tuple[str, ...]
    weight: float


@dataclass(frozen=True)
class StreamConfig:
    """Everything a worker needs to rebuild its stream (picklable)."""

    sets: tuple[SetSpec, ...]
    text_kind: str
    frames: int
    cond_frames: int
    size: tuple[int, int] | None
    batch_size: int
    shuffle_buffer: int
    seed: int
    allow_commands: bool = False  # the user's opt-in to pipe:/URL shard sources (data.allow_commands)
    rounds: int = 1  # > 1: multi-round windows (see ExampleDecoder)
    open_on_reference: bool = False  # a window may open on "again" / "go back" (see ExampleDecoder)
    encoded: bool = False  # read the precomputed inputs of `shards encode` (data.precomputed)
    needs_frames: bool = True  # with `encoded`: also decode the window's pixels (a generator without a VAE)
    recolor: float = 0.0  # share of clips recoloured (data.recolor, see dataset.recolor)
    recolor_avoid: tuple = ()  # colours a recoloured clip must stay away from (data.recolor_avoid)
    recolor_avoid_radius: float = 100.0


def seeded(*parts) -> random.Random:
    """A random.Random for one named position of the stream; the same in every process."""
    return random.Random(":".join(str(p) for p in parts))


def block_counts(weights: list[float], block: int) -> list[int]:
    """Split `block` draws among the sets in proportion to `weights` (largest remainders)."""
    total = sum(weights)
    exact = [w / total * block for w in weights]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (exact[i] - counts[i], -i), reverse=True)
    for i in by_remainder[: block - sum(counts)]:
        counts[i] += 1
    return counts


def set_draws(weights: list[float], block: int, seed: int, epoch: int, slot: int) -> Iterator[int]:
    """The set index of each draw: blocks of `block` draws, each a random order of `block_counts`."""
    for b in itertools.count():
        remaining = block_counts(weights, block)
        rng = seeded("mix", seed, epoch, slot, b)
        for left in range(block, 0, -1):
            r = rng.randrange(left)
            for i, count in enumerate(remaining):
                if r < count:
                    remaining[i] -= 1
                    yield i
                    break
                r -= count


# A reader that draws this many unusable samples in a row (corrupt, or without the stage's text) stops
# the run: no batch can be made, so the limit on corrupt samples would never be checked.
UNUSABLE_STREAK = 256


def set_passes(cfg: StreamConfig, index: int, epoch: int, slot: int, n_slots: int) -> Iterator[dict]:
    """Raw samples of one set for one slot, pass after pass (endless), each pass shuffled."""
    spec = cfg.sets[index]
    buffer = max(1, cfg.shuffle_buffer // len(cfg.sets))
    for p in itertools.count():
        order = list(spec.urls)
        seeded("shards", cfg.seed, epoch, index, p).shuffle(order)
        if len(order) >= n_slots:
            samples = read_shards(order[slot::n_slots], cfg.allow_commands)
        else:  # every slot reads the whole set; a damaged region (an item of its own) goes to one slot
            samples = (s for i, s in enumerate(read_shards(order, cfg.allow_commands)) if i % n_slots == slot)
        if buffer > 1:
            rng = seeded("shuffle", cfg.seed, epoch, index, p, slot)
            samples = wds.shuffle(buffer, initial=buffer, rng=rng)(iter(samples))
        got = 0
        for sample in samples:
            got += 1
            yield sample
        if got == 0:
            raise PandoraError(
                f"shard set '{spec.name}' gave reader {slot} of {n_slots} no sample in a whole pass over "
                f"{len(order)} shard(s): are they empty or unreadable? Check them with `pandora-lightning shards verify`."
            )


def raw_stream(cfg: StreamConfig, epoch: int, slot: int, n_slots: int, block: int) -> Iterator[dict]:
    """One slot's mixed raw samples for one epoch (endless)."""
    passes = [set_passes(cfg, i, epoch, slot, n_slots) for i in range(len(cfg.sets))]
    weights = [s.weight for s in cfg.sets]
    return (next(passes[i]) for i in set_draws(weights, block, cfg.seed, epoch, slot))


def worker_batches(length: int, workers: int, worker: int) -> int:
    """Batches that worker `worker` of `workers` delivers in an epoch of `length` batches (round robin)."""
    return len(range(worker, length, workers))


class ShardStream(IterableDataset):
    """Batches {"frames", "text", "domain", "key", "_stream"} of one slot; `ShardLoader` sets the slot.

    `_stream` carries what the training process must know about the worker that made the batch:
    its (logical) worker index, its raw draws so far this epoch, and its new seen / corrupt counts
    with a (where, why) report per corrupt sample.
    """

    def __init__(self, cfg: StreamConfig):
        self.cfg = cfg
        self.rank, self.world_size, self.epoch, self.length = 0, 1, 0, 1
        self.worker_offset = 0  # on resume, physical worker w plays logical worker (w + offset) % W
        self.skip: dict[int, int] = {}  # logical worker -> raw draws to replay without decoding

    def __iter__(self):
        info = get_worker_info()
        workers, physical = (info.num_workers, info.id) if info is not None else (1, 0)
        worker = (physical + self.worker_offset) % workers
        slot, n_slots = self.rank * workers + worker, self.world_size * workers
        block = max(1, worker_batches(self.length, workers, worker)) * self.cfg.batch_size
        return self._batches(worker, slot, n_slots, block, self.skip.get(worker, 0))

    def _batches(self, worker: int, slot: int, n_slots: int, block: int, skip: int):
        cfg = self.cfg
        counter = BadSampleCounter()
        if cfg.encoded:
            decoder = EncodedExampleDecoder(cfg.text_kind, cfg.frames, cfg.cond_frames, counter, cfg.size, cfg.needs_frames)
        else:
            decoder = ExampleDecoder(cfg.text_kind, cfg.frames, cfg.cond_frames, counter, cfg.size, cfg.rounds,
                                     cfg.open_on_reference, cfg.recolor, cfg.recolor_avoid, cfg.recolor_avoid_radius)
        reported = (0, 0)
        examples, streak = [], 0
        for draw, raw in enumerate(raw_stream(cfg, self.epoch, slot, n_slots, block)):
            if draw < skip:  # consumed before the checkpoint: not decoded (nor counted) again
                continue
            example = decoder(raw, seeded("window", cfg.seed, self.epoch, slot, draw))
            if example is None:
                streak += 1
                if streak >= UNUSABLE_STREAK:
                    raise PandoraError(unusable_message(cfg, counter, streak))
                continue
            examples.append(example)
            streak = 0
            if len(examples) == cfg.batch_size:
                batch = collate(examples)
                batch["_stream"] = {
                    "worker": worker,
                    "draws": draw + 1,
                    "seen": counter.seen - reported[0],
                    "no_text": counter.no_text - reported[1],
                    "no_text_example": counter.no_text_example,
                    "reports": counter.reports,
                }
                reported, counter.reports, examples = (counter.seen, counter.no_text), [], []
                yield batch


def unusable_message(cfg: StreamConfig, counter: BadSampleCounter, streak: int) -> str:
    """Why a reader gave up: the last `streak` samples it drew could not be used."""
    if counter.no_text and not counter.reports:
        return (f"the last {streak} samples drawn have no {cfg.text_kind} text, which this stage trains on "
                f"(data.text_kind={cfg.text_kind}); e.g. {counter.no_text_example}")
    url, key, reason = counter.reports[-1] if counter.reports else ("?", "?", "?")
    return (f"the last {streak} samples drawn could not be used ({len(counter.reports)} corrupt, {counter.no_text} "
            f"without a {cfg.text_kind} text); last: {url}:{printable(key)}: {reason}. "
            f"Check the shards with `pandora-lightning shards verify`")
