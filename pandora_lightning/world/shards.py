"""Write procedural-world episodes as webdataset tar shards.

Each sample holds ``mp4`` (``encode_mp4`` bytes of the ``(T, H, W, 3) uint8``
episode) and ``json`` (UTF-8 JSON metadata, see ``episode_metadata``).
Shards are named ``{split}-{domain}-{index:06d}.tar``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from pandora_lightning.data.manifest import Manifest, load_manifest, write_manifest
from pandora_lightning.data.tar import sample_hash
from pandora_lightning.data.video import encode_mp4
from pandora_lightning.training.vocabulary import write_vocabulary_file
from pandora_lightning.world.domains import ALL_DOMAINS, DOMAINS, TRANSFER_DOMAIN
from pandora_lightning.world.vocabulary import vocabulary_path, world_vocabulary
from pandora_lightning.world.simulator import SPLITS, Episode, WorldConfig, sample_episode, split_actions


def episode_metadata(ep: Episode, cfg: WorldConfig, split: str) -> dict:
    """JSON-serialisable description of an episode (everything but the pixels)."""
    return {
        "caption": ep.caption,
        "actions": [dict(a) for a in ep.actions],
        "domain": ep.domain,
        "source": "world",
        "split": split,
        "fps": cfg.fps,
        "cond_frames": cfg.cond_frames,
        "round_frames": cfg.round_frames,
        "image_size": cfg.image_size,
        "num_frames": int(ep.frames.shape[0]),
        # Rounded: exact states are recomputable, 1e-4 px is far below a pixel.
        "states": [[round(v, 4) for v in s.as_list()] for s in ep.states],
    }


def _split_domains(cfg: WorldConfig, split: str) -> tuple[str, ...]:
    if split == "train":
        return cfg.domains + cfg.practice
    if split not in ("transfer", "adapt"):
        return cfg.domains
    if TRANSFER_DOMAIN not in cfg.domains:
        raise ValueError(
            f"counts asks for the {split!r} split but cfg.domains={cfg.domains} lacks the transfer "
            f"domain {TRANSFER_DOMAIN!r}; add it to cfg.domains or drop {split!r} from counts"
        )
    return (TRANSFER_DOMAIN,)


def _check_counts(counts: dict[str, int], samples_per_shard: int) -> None:
    unknown = [s for s in counts if s not in (*SPLITS, "practice")]
    if unknown:
        raise ValueError(f"counts has unknown splits {unknown}; use keys from {SPLITS} (or 'practice')")
    negative = {s: n for s, n in counts.items() if n < 0}
    if negative:
        raise ValueError(f"counts must be >= 0 episodes per domain, got {negative}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")


def _write_split_domain(
    out_dir: Path, cfg: WorldConfig, split: str, domain: str, count: int, samples_per_shard: int, seed: int, bar=None
) -> dict:
    """Write ``count`` episodes of one (split, domain) and return its record."""
    # One independent stream per (split, domain): val/transfer start states
    # never replay train's, and adding a domain does not shift the others.
    rng = np.random.default_rng([seed, SPLITS.index(split), list(ALL_DOMAINS).index(domain)])
    allowed = split_actions(domain, split)
    shards: list[str] = []
    index: list[dict] = []
    writer = None
    try:
        for i in range(count):
            if i % samples_per_shard == 0:
                if writer is not None:
                    writer.close()
                shards.append(f"{split}-{domain}-{len(shards):06d}.tar")
                # A whole-second time: plain ustar headers (a float time needs a pax header per
                # member, which doubles tar parsing) and byte-identical shards for the same seed.
                writer = wds.TarWriter(str(out_dir / shards[-1]), mtime=0)
            ep = sample_episode(cfg, domain, rng, allowed, split=split)
            sample = {
                "__key__": f"{split}-{domain}-{i:06d}",
                "mp4": encode_mp4(ep.frames, cfg.fps),
                "json": json.dumps(episode_metadata(ep, cfg, split)).encode("utf-8"),
            }
            writer.write(sample)
            if bar is not None:
                bar.update()
            index.append({"key": sample["__key__"], "shard": shards[-1], "split": split, "domain": domain,
                          "hash": sample_hash(sample)})
    finally:
        if writer is not None:
            writer.close()
    return {"split": split, "domain": domain, "shards": shards, "samples": count, "index": index}


def _count(counts: dict[str, int], split: str, domain: str) -> int:
    """Episodes of one (split, domain): a practice domain's train episodes are ``counts["practice"]``
    (default: as many as a scored domain's)."""
    if domain in DOMAINS:
        return counts[split]
    return counts.get("practice", counts[split])


def write_world_shards(
    out_dir: str | Path,
    cfg: WorldConfig,
    counts: dict[str, int],
    samples_per_shard: int = 64,
    seed: int | None = None,
    progress: bool = False,
) -> list[dict]:
    """Write world episodes for each split in ``counts`` (episodes per domain).

    "train", "val" and "phrasings" cover every domain of ``cfg.domains`` (the transfer domain
    without its held-out actions), "train" also the practice domains of ``cfg.practice``
    (``counts["practice"]`` episodes each); "transfer" covers only the transfer domain, with all of its
    actions. Held-out splits draw reserved start colours and have ``cfg.rounds_for(split)`` rounds.
    ``seed`` defaults to ``cfg.seed``.
    Returns one ``{"split", "domain", "shards", "samples"}`` record per
    written (split, domain), shard names relative to ``out_dir``.
    """
    _check_counts(counts, samples_per_shard)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed if seed is None else int(seed)
    records = []
    plan = [(split, domain, _count(counts, split, domain)) for split in SPLITS if counts.get(split, 0)
            for domain in _split_domains(cfg, split) if _count(counts, split, domain)]
    with tqdm(total=sum(n for *_, n in plan), unit="episode", desc="shards world", disable=not progress) as bar:
        for split, domain, count in plan:
            records.append(_write_split_domain(out, cfg, split, domain, count, samples_per_shard, seed, bar))
    # Which shard holds which key, with a content hash: `shards verify` finds lost and altered samples by it.
    lines = [line for record in records for line in record.pop("index")]
    (out / "index.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return records


# The manifest name of the world's shards. It changes whenever the sampler or the domains do, so that
# `make demo` rewrites shards left over from an older world instead of training on them.
WORLD_NAME = "world-v2"


def write_world(
    out_dir: str | Path, manifest: str | Path, cfg: WorldConfig, counts: dict[str, int], samples_per_shard: int = 64,
    progress: bool = False,
) -> Manifest:
    """The world's shards, their manifest and, beside it, the world's vocabulary file."""
    records = write_world_shards(out_dir, cfg, counts, samples_per_shard=samples_per_shard, progress=progress)
    written = write_manifest(manifest, WORLD_NAME, out_dir, records + adapt_replay(records))
    write_vocabulary_file(vocabulary_path(manifest), world_vocabulary(history=cfg.history > 0, practice=cfg.practice))
    return written


# Training episodes of each other domain mixed into the "adapt" split (a third of its stream beside
# 48 desert episodes), so that an adapter learns the new dynamics without unlearning the old ones.
ADAPT_REPLAY = 8


def adapt_replay(records: list[dict]) -> list[dict]:
    """Manifest sets that mix a few train episodes of the other domains into the adapt split."""
    if not any(r["split"] == "adapt" for r in records):
        return []
    return [{**r, "split": "adapt", "samples": ADAPT_REPLAY} for r in records
            if r["split"] == "train" and r["domain"] in DOMAINS and r["domain"] != TRANSFER_DOMAIN]


def ensure_world(
    manifest: str | Path, out_dir: str | Path, counts: dict[str, int], samples_per_shard: int = 128, cfg: WorldConfig | None = None
) -> None:
    """Write the built-in world's shards and manifest unless they (of this world version) are already there."""
    try:
        loaded = load_manifest(manifest)
        for shard_set in loaded.sets:
            loaded.urls(shard_set)
        if vocabulary_path(manifest).is_file() and loaded.name == WORLD_NAME:
            return
    except (ValueError, FileNotFoundError):
        pass
    write_world(out_dir, manifest, cfg or WorldConfig(), counts, samples_per_shard)
