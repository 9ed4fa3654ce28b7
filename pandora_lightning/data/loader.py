"""The training loader: epochs of a fixed length, a resumable position, data counters for the logs.

`ShardLoader` drives a `stream.ShardStream` through a torch DataLoader (batches are made in the
workers) and is what `train.fit` hands to Lightning. It is not a DataLoader itself, so Lightning
leaves it as it is (no sampler injection), and:
- `len()` is the epoch in batches per rank: `epoch_samples // (world_size * batch_size)`. With a
  length, Lightning's fetcher does not prefetch, so the batches the loader delivered are exactly the
  batches training consumed when a checkpoint is written;
- `state_dict()` / `load_state_dict()` make it a stateful loader that Lightning saves in every
  checkpoint and restores on resume (`trainer.fit(..., ckpt_path=...)`): the batches delivered so far
  and, per rank and worker, the raw draws of the current epoch (gathered from every rank, since
  only rank 0 writes the file);
- after a restore, physical worker w plays logical worker (w + position) % W, so that the round
  robin of the DataLoader continues with the worker an uninterrupted run would use next.
The global random state (diffusion noise) is saved and restored by `monitor.RandomState`. With the
spawn/fork DDP launchers the process that called `fit` never trains, so resume from the checkpoints
the ranks write (`checkpoints/last.ckpt`); the model file `final.safetensors` holds no training state.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from pandora_lightning.data.config import DataConfig
from pandora_lightning.errors import PandoraError
from pandora_lightning.data.dataset import bad_limit_reached
from pandora_lightning.data.manifest import Manifest, ShardSet
from pandora_lightning.data.stream import SetSpec, ShardStream, StreamConfig
from pandora_lightning.data.tar import printable

log = logging.getLogger(__name__)
STATE_VERSION = 1


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) outside a distributed job."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_from_ranks(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (a collective: every rank must call it)."""
    rank, world = dist_info()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


class ShardLoader:
    """Endless mixed shard stream -> epochs of `len(self)` batches per rank, resumable at any batch."""

    def __init__(self, stream: ShardStream, num_workers: int, epoch_samples: int, max_bad_fraction: float = 0.05,
                 min_bad_samples: int = 4):
        self.stream, self.num_workers, self.epoch_samples = stream, num_workers, epoch_samples
        self.max_bad_fraction, self.min_bad_samples = max_bad_fraction, min_bad_samples
        self.batch_size = stream.cfg.batch_size
        self.position = 0  # batches delivered since training started, all epochs
        self.draws: dict[int, int] = {}  # logical worker -> raw draws taken this epoch
        self.seen = 0  # samples read on this rank (a sample read again in a later pass counts again)
        self.no_text = 0  # sound samples skipped on this rank for lack of the stage's text
        # Corrupt samples of the whole run, "shard:key" -> reason, each once however often it is read
        # (`DataMonitor` merges the ranks' new ones, so under DDP every rank holds the same set).
        self.bad_samples: dict[str, str] = {}
        self.new_bad: list[tuple[str, str]] = []  # found on this rank since the last merge
        self.last_wait_s = 0.0  # how long the last batch kept training waiting

    @property
    def bad(self) -> int:
        return len(self.bad_samples)

    def __len__(self) -> int:
        _, world = dist_info()
        batches = self.epoch_samples // (world * self.batch_size)
        if batches < 1:
            raise PandoraError(
                f"an epoch of {self.epoch_samples} samples is less than one batch of {self.batch_size} on each of "
                f"{world} rank(s); raise data.epoch_samples or lower data.batch_size"
            )
        return batches

    def __iter__(self):
        return self._epoch()  # a generator: nothing starts before the first batch is asked for

    def _epoch(self):
        rank, world = dist_info()
        length, workers = len(self), max(1, self.num_workers)
        epoch, index = divmod(self.position, length)
        if index == 0:
            self.draws = {}
        stream = self.stream
        stream.rank, stream.world_size, stream.epoch, stream.length = rank, world, epoch, length
        stream.worker_offset, stream.skip = index % workers, dict(self.draws)
        if rank == 0 and index == 0 and epoch == 0:
            for spec in stream.cfg.sets:
                if len(spec.urls) < world * workers:
                    log.info(
                        "set %s has %d shard(s) for %d readers: each reader reads all of them and keeps its share "
                        "of the samples; write at least nodes x GPUs x workers shards to split by shards",
                        spec.name, len(spec.urls), world * workers,
                    )
        # The generator keeps the DataLoader away from the global torch RNG (training's noise).
        loader = DataLoader(
            stream, batch_size=None, num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(stream.cfg.seed), persistent_workers=False,
        )
        batches = iter(loader)
        for _ in range(index, length):
            started = time.perf_counter()
            try:
                batch = next(batches)
            except PandoraError as err:  # from a worker: torch wraps it with the worker's traceback
                raise PandoraError(worker_message(err)) from None
            self.last_wait_s = time.perf_counter() - started
            self._account(batch.pop("_stream"))
            self.position += 1
            yield batch

    def _account(self, info: dict) -> None:
        self.draws[info["worker"]] = info["draws"]
        self.seen += info["seen"]
        if info["no_text"] and not self.no_text:
            kind = self.stream.cfg.text_kind
            log.warning("skipping samples without a %s text, which this stage trains on (data.text_kind=%s); e.g. %s; "
                        "data/no_text_samples counts them", kind, kind, info["no_text_example"])
        self.no_text += info["no_text"]
        for url, key, reason in info["reports"]:
            self.add_bad(f"{url}:{printable(key)}", reason)

    def add_bad(self, where: str, reason: str, log_it: bool = True) -> None:
        """Count a corrupt sample once per run (by "shard:key")."""
        if where in self.bad_samples:
            return
        self.bad_samples[where] = reason
        self.new_bad.append((where, reason))
        if log_it:
            log.warning("skipping corrupt sample %s: %s (%d corrupt so far)", where, reason, self.bad)

    def stop_reason(self, seen: int | None = None) -> str | None:
        """Why the run must stop for corrupt data (see DataConfig.max_bad_fraction), or None.
        `seen`: samples read by the whole job (default: this rank's)."""
        read = min(self.seen if seen is None else seen, self.epoch_samples)
        if not bad_limit_reached(self.bad, read, self.max_bad_fraction, self.min_bad_samples):
            return None
        where, reason = next(reversed(self.bad_samples.items()))
        return (f"{self.bad} corrupt samples among {read} read ({self.bad / max(1, read):.1%}; the limit is "
                f"data.max_bad_fraction={self.max_bad_fraction:g}, once at least data.min_bad_samples="
                f"{self.min_bad_samples}); last: {where}: {reason}")

    def _geometry(self) -> dict:
        _, world = dist_info()
        return {"world_size": world, "num_workers": self.num_workers, "batch_size": self.batch_size,
                "epoch_batches": len(self)}

    def state_dict(self) -> dict:
        mine = {"draws": dict(self.draws), "seen": self.seen, "no_text": self.no_text}
        return {"version": STATE_VERSION, "position": self.position, **self._geometry(), "ranks": gather_from_ranks(mine),
                "bad_samples": dict(self.bad_samples)}

    def load_state_dict(self, state: dict) -> None:
        rank, _ = dist_info()
        self.bad_samples, self.new_bad = dict(state.get("bad_samples", {})), []  # counted once per run, resumes included
        saved = {k: state.get(k) for k in self._geometry()}
        if state.get("version") == STATE_VERSION and saved == self._geometry():
            self.position = state["position"]
            mine = state["ranks"][rank]
            self.draws = {int(k): int(v) for k, v in mine["draws"].items()}
            self.seen, self.no_text = mine["seen"], mine.get("no_text", 0)
            return
        # Another geometry reads other slots: the epoch cannot continue exactly; start the next one.
        epochs_done = -(-state["position"] // state["epoch_batches"])
        self.position, self.draws = epochs_done * len(self), {}
        log.warning(
            "the checkpoint's data position was saved with %s, this run has %s: the data order cannot continue "
            "exactly, so training goes on from the start of epoch %d", saved, self._geometry(), epochs_done,
        )


def chosen_sets(manifest: Manifest, split: str, domains: Sequence[str] = ()) -> list[ShardSet]:
    """The shard sets of `split`, only those of `domains` when given (data.domains); an unknown domain is refused."""
    sets = manifest.sets_for(split)
    if not domains:
        return sets
    have = [s.domain for s in sets]
    missing = [d for d in domains if d not in have]
    if missing:
        raise PandoraError(f"data.domains: {', '.join(missing)} not in split '{split}' of manifest {manifest.path} "
                           f"(it has: {', '.join(have)}); list domains it has, or leave data.domains empty for all")
    return [s for s in sets if s.domain in domains]


def training_loader(
    manifest: Manifest, data: DataConfig, text_kind: str, frames: int, cond_frames: int, size: tuple[int, int], seed: int
) -> ShardLoader:
    """The loader for a recipe's data block: `data.split` of `manifest`, windows of `frames` frames of `size` (H, W)."""
    sets = chosen_sets(manifest, data.split, data.domains)
    cfg = StreamConfig(
        sets=tuple(SetSpec(f"{s.split}/{s.domain}", tuple(manifest.urls(s)), s.weight) for s in sets),
        text_kind=text_kind,
        frames=frames,
        cond_frames=cond_frames,
        size=tuple(size),
        batch_size=data.batch_size,
        shuffle_buffer=data.shuffle_buffer,
        seed=seed,
        allow_commands=manifest.allow_commands,
        rounds=data.rounds,
        open_on_reference=data.open_on_reference,
        encoded=data.precomputed,
        needs_frames=manifest.encoding.needs_frames if manifest.encoding is not None else True,
        recolor=data.recolor,
        recolor_avoid=tuple(map(tuple, data.recolor_avoid)),
        recolor_avoid_radius=data.recolor_avoid_radius,
    )
    epoch_samples = data.epoch_samples or sum(s.samples for s in sets)
    return ShardLoader(ShardStream(cfg), data.num_workers, epoch_samples, data.max_bad_fraction, data.min_bad_samples)


def worker_message(err: Exception) -> str:
    """The project's one-line message inside an error a DataLoader worker raised (torch re-raises it
    with the worker's whole traceback in the text)."""
    text = str(err)
    if "\n" not in text:
        return text
    for line in reversed(text.splitlines()):
        if "Error: " in line and line.split(":", 1)[0].rsplit(".", 1)[-1].endswith("Error"):
            return line.split(": ", 1)[1]
    return text.splitlines()[-1] if text else type(err).__name__
