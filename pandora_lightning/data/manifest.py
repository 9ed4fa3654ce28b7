"""Data manifests: named shard sets per split and domain, with mixing weights and sample counts.

    name: world
    root: ../data/world            # relative to this file; shard patterns are relative to root
    sets:
      - {split: train, domain: meadow, shards: ["train-meadow-{000000..000003}.tar"], weight: 0.5, samples: 512}
      - {split: train, domain: robot, shards: ["robot/*.tar"], weight: 0.3, samples: 2000}
      - {split: train, domain: web, shards: ["pipe:curl -s https://host/web-{0000..0999}.tar"], weight: 0.2, samples: 90000}

A shard pattern is a file name, a glob or a brace pattern under `root`, or a URL that webdataset
opens itself (`http://`, `https://`, `pipe:...`, ...). A URL or `pipe:` entry RUNS A COMMAND
(`pipe:` a shell command, a URL curl or a cloud tool), so a manifest that has one is refused unless
the user opts in: `data.allow_commands: true` in the recipe, `--allow-commands` on the command line
(`load_manifest(..., allow_commands=True)`). The training stream draws the sets of one
split in proportion to their weights, so the weights of a split must sum to 1; `samples` (the
number of samples in the set) sets the epoch length. `load_manifest` checks all of that, and that
every local shard exists, and stops with one clear error otherwise.
"""
from __future__ import annotations

import glob
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from braceexpand import braceexpand
from omegaconf import OmegaConf

from pandora_lightning.config import load_structured
from pandora_lightning.data.tar import check_sources, is_command
from pandora_lightning.errors import PandoraError

WEIGHT_TOLERANCE = 1e-3


@dataclass
class ShardSet:
    split: str = "train"
    domain: str = "default"
    shards: list[str] = field(default_factory=list)  # file names, globs or brace patterns; URLs pass through
    weight: float = 1.0  # share of the split's training stream drawn from this set; a split's weights sum to 1
    samples: int = 0  # samples in the set (epoch length and reports)

    def __post_init__(self):
        name = f"set '{self.split}/{self.domain}'"
        if self.weight <= 0:
            raise ValueError(f"{name}: weight must be > 0, got {self.weight}")
        if self.samples <= 0:
            raise ValueError(
                f"{name}: samples must be > 0, got {self.samples} (the number of samples in the set; "
                "`shards build` writes it, `shards inspect` counts it)"
            )
        if not self.shards:
            raise ValueError(f"{name}: shards is empty; list file names, globs, brace patterns or URLs")


def is_url(pattern: str) -> bool:
    return "://" in pattern or pattern.startswith("pipe:")


def command_patterns(manifest: Manifest) -> list[tuple[ShardSet, str]]:
    """(set, pattern) of every entry that runs a command to be read."""
    return [(s, p) for s in manifest.sets for p in s.shards if is_command(p)]


@dataclass
class EncodingRecord:
    """What `shards encode` stored beside each sample, and with which encoders (see data/encoded.py)."""

    recipe: str = ""  # the recipe the encoders came from (for messages)
    family: str = "tiny"  # generator family
    height: int = 0  # frame size the clips were decoded at
    width: int = 0
    frames: int = 0  # generator.frames and cond_frames of that recipe
    cond_frames: int = 0
    dtype: str = "float32"
    # encoder module name (vision, text_encoder, generator.vae, ...) -> digest of its folder or of its tensors
    encoders: dict[str, str] = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=dict)  # module name -> the folder it was read from
    needs_frames: bool = True  # the generator also reads the pixels (pixel-space family: no VAE)


@dataclass
class Manifest:
    name: str = "unnamed"
    root: str = "."
    sets: list[ShardSet] = field(default_factory=list)
    encoding: EncodingRecord | None = None  # set by `shards encode`: the samples carry precomputed inputs
    path: ClassVar[str] = ""  # where it was read from; set by load_manifest
    allow_commands: ClassVar[bool] = False  # the user's opt-in to pipe:/URL sources; set by load_manifest

    def splits(self) -> list[str]:
        return sorted({s.split for s in self.sets})

    def sets_for(self, split: str) -> list[ShardSet]:
        sets = [s for s in self.sets if s.split == split]
        if not sets:
            raise PandoraError(
                f"manifest {self.path}: no shard sets for split '{split}' (it has: {', '.join(self.splits()) or 'none'})"
            )
        return sets

    def urls(self, shard_set: ShardSet) -> list[str]:
        """Expand one set's patterns to existing shard files (or pass URLs through); error if none."""
        root = Path(self.root)
        if not root.is_absolute():
            root = Path(self.path).parent / root
        urls: list[str] = []
        for pattern in shard_set.shards:
            if is_url(pattern):
                urls.extend(braceexpand(pattern))
                continue
            for expanded in braceexpand(pattern):
                full = str(root / expanded)
                matches = sorted(glob.glob(full)) if any(c in expanded for c in "*?[") else [full]
                missing = [m for m in matches if not Path(m).is_file()]
                if missing:
                    raise PandoraError(
                        f"manifest {self.path}: set '{shard_set.split}/{shard_set.domain}' names missing shard "
                        f"{missing[0]}; build the shards first (e.g. `pandora-lightning shards world`)"
                    )
                urls.extend(matches)
        if not urls:
            raise PandoraError(
                f"manifest {self.path}: set '{shard_set.split}/{shard_set.domain}' has no shards "
                f"(patterns {shard_set.shards} matched nothing under {root})"
            )
        return urls

    def check(self, check_shards: bool = True) -> None:
        """Weights of each split sum to 1, no (split, domain) twice, every local shard exists."""
        seen: set[tuple[str, str]] = set()
        for shard_set in self.sets:
            pair = (shard_set.split, shard_set.domain)
            if pair in seen:
                raise PandoraError(f"manifest {self.path}: set '{pair[0]}/{pair[1]}' appears twice; merge its shards")
            seen.add(pair)
        for split in self.splits():
            weights = [s.weight for s in self.sets_for(split)]
            if abs(sum(weights) - 1) > WEIGHT_TOLERANCE:
                hint = ", ".join(f"{s.domain}: {s.weight / sum(weights):.4g}" for s in self.sets_for(split))
                raise PandoraError(
                    f"manifest {self.path}: the weights of split '{split}' sum to {sum(weights):.4g}, not 1 "
                    f"(the same mix normalised: {hint})"
                )
        for shard_set in self.sets if check_shards else ():
            self.urls(shard_set)


def load_manifest(path: str | Path | None, check_shards: bool = True, allow_commands: bool = False) -> Manifest:
    """Read and validate a manifest; `check_shards=False` skips looking for the shard files.
    Entries that run commands (`pipe:`, URLs) are refused unless `allow_commands`."""
    if path is None:
        raise PandoraError("no data manifest given: set data.manifest (e.g. data_manifests/world.yaml, which "
                           "`pandora-lightning shards world` writes) or --manifest")
    manifest = load_structured(Manifest, [path], f"manifest {path}")
    manifest.path = str(path)
    manifest.allow_commands = bool(allow_commands)
    commands = command_patterns(manifest)
    if commands and not allow_commands:
        shard_set, pattern = commands[0]
        check_sources([pattern], False, f"manifest {path}: set '{shard_set.split}/{shard_set.domain}'")
    if not manifest.sets:
        raise PandoraError(f"manifest {path}: it lists no shard sets under 'sets'")
    manifest.check(check_shards)
    return manifest


def split_weights(records: list[dict]) -> list[float]:
    """Weights proportional to each record's samples within its split (each sample once an epoch)."""
    totals: dict[str, int] = {}
    for r in records:
        totals[r["split"]] = totals.get(r["split"], 0) + r["samples"]
    return [round(r["samples"] / totals[r["split"]], 6) for r in records]


def write_manifest(
    path: str | Path, name: str, shard_dir: str | Path, records: list[dict], written_by: str = "shards world",
    encoding: EncodingRecord | None = None,
) -> Manifest:
    """Write a manifest for `records` ({split, domain, shards, samples}) of shards in `shard_dir`.

    Each set's weight is its share of its split's samples, so an epoch reads every sample once.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = Path(os.path.relpath(Path(shard_dir).resolve(), path.parent.resolve()))
    weights = split_weights(records)
    manifest = Manifest(
        name=name,
        root=str(root),
        sets=[ShardSet(r["split"], r["domain"], list(r["shards"]), w, r["samples"]) for r, w in zip(records, weights)],
        encoding=encoding,
    )
    body = asdict(manifest)
    if encoding is None:
        del body["encoding"]
    body = OmegaConf.to_yaml(body)
    path.write_text(
        f"# Written by `pandora-lightning {written_by}`; shard names are relative to root.\n"
        f"# weight: share of the split's training stream (a split's weights sum to 1); samples: samples in the set.\n"
        f"{body}"
    )
    manifest.path = str(path)
    return manifest
