"""Data manifests: named shard sets per split and domain, with mixing weights and sample counts.

    name: world
    root: ../data/world            # relative to this file; shard patterns are relative to root
    sets:
      - {split: train, domain: meadow, shards: ["train-meadow-{000000..000003}.tar"], weight: 1.0, samples: 256}
"""
from __future__ import annotations

import glob
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from braceexpand import braceexpand
from omegaconf import OmegaConf

from pandora_lightning.config import ConfigError, load_structured


@dataclass
class ShardSet:
    split: str = "train"
    domain: str = "default"
    shards: list[str] = field(default_factory=list)  # file names, globs or brace patterns; URLs pass through
    weight: float = 1.0  # mixing weight among the sets of one split
    samples: int = 0  # samples in the set (for epoch sizes and reports)

    def __post_init__(self):
        if self.weight <= 0:
            raise ValueError(f"set '{self.split}/{self.domain}': weight must be > 0, got {self.weight}")


@dataclass
class Manifest:
    name: str = "unnamed"
    root: str = "."
    sets: list[ShardSet] = field(default_factory=list)
    path: ClassVar[str] = ""  # where it was read from; set by load_manifest

    def splits(self) -> list[str]:
        return sorted({s.split for s in self.sets})

    def sets_for(self, split: str) -> list[ShardSet]:
        sets = [s for s in self.sets if s.split == split]
        if not sets:
            raise ConfigError(
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
            if "://" in pattern or pattern.startswith("pipe:"):
                urls.extend(braceexpand(pattern))
                continue
            for expanded in braceexpand(pattern):
                full = str(root / expanded)
                matches = sorted(glob.glob(full)) if any(c in expanded for c in "*?[") else [full]
                missing = [m for m in matches if not Path(m).is_file()]
                if missing:
                    raise ConfigError(
                        f"manifest {self.path}: set '{shard_set.split}/{shard_set.domain}' names missing shard "
                        f"{missing[0]}; build the shards first (e.g. `pandora-lightning shards world`)"
                    )
                urls.extend(matches)
        if not urls:
            raise ConfigError(
                f"manifest {self.path}: set '{shard_set.split}/{shard_set.domain}' has no shards "
                f"(patterns {shard_set.shards} matched nothing under {root})"
            )
        return urls


def load_manifest(path: str | Path) -> Manifest:
    manifest = load_structured(Manifest, [path], f"manifest {path}")
    manifest.path = str(path)
    if not manifest.sets:
        raise ConfigError(f"manifest {path}: it lists no shard sets under 'sets'")
    return manifest


def write_manifest(path: str | Path, name: str, shard_dir: str | Path, records: list[dict]) -> Manifest:
    """Write a manifest for `records` ({split, domain, shards, samples}) of shards in `shard_dir`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = Path(os.path.relpath(Path(shard_dir).resolve(), path.parent.resolve()))
    manifest = Manifest(
        name=name,
        root=str(root),
        sets=[ShardSet(r["split"], r["domain"], list(r["shards"]), 1.0, r["samples"]) for r in records],
    )
    body = OmegaConf.to_yaml(asdict(manifest))
    path.write_text(f"# Written by `pandora-lightning shards world`; shard names are relative to root.\n{body}")
    manifest.path = str(path)
    return manifest
