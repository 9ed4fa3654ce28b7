"""`pandora-lightning shards encode`: copy a manifest's shards, adding each sample's precomputed inputs.

The encoders themselves come from the caller (`training.precompute` builds them from a recipe): this
tool decodes every clip at the recipe's frame size (as the training loader does), asks `encode` for
the sample's tensors (see data/encoded.py for what they are), and writes shards with the same keys
and members plus `encoded.safetensors`, then a manifest of the same sets and weights that points at
them and records the encoders (`EncodingRecord`). A corrupt sample is skipped and reported, as
training would skip it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from pandora_lightning.data.dataset import parse_meta, read_shards
from pandora_lightning.data.encoded import MEMBER, given_frames, pack, sample_texts
from pandora_lightning.data.manifest import EncodingRecord, Manifest, write_manifest
from pandora_lightning.data.tar import printable
from pandora_lightning.data.video import decode_mp4
from pandora_lightning.errors import PandoraError

log = logging.getLogger(__name__)
# (frames (T, 3, H, W) uint8, indices of the frames whose vision features to store, texts) -> tensors
Encoder = Callable[[torch.Tensor, list[int], list[str]], dict[str, torch.Tensor]]


def encode_shards(manifest: Manifest, out: str | Path, encode: Encoder, record: EncodingRecord,
                  manifest_path: str | Path | None = None, progress: bool = True, splits: list[str] | None = None) -> dict:
    """Every set of `manifest` (of `splits`, default all) -> encoded shards under `out` + their manifest; a summary dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records, skipped, written, names = [], [], 0, set()
    sets = [s for split in (splits or manifest.splits()) for s in manifest.sets_for(split)]
    bar = tqdm(total=sum(s.samples for s in sets), desc="shards encode", unit="clip", disable=not progress)
    for shard_set in sets:
        shards, count = [], 0
        for url in manifest.urls(shard_set):
            name = Path(url).name if Path(url).name not in names else f"{shard_set.split}-{shard_set.domain}-{Path(url).name}"
            names.add(name)
            tmp = out / f"{name}.tmp"
            with wds.TarWriter(str(tmp)) as writer:
                for sample in read_shards([url], manifest.allow_commands):
                    try:
                        member = _encoded_sample(sample, encode, record)
                    except PandoraError:
                        raise
                    except Exception as err:  # noqa: BLE001 - untrusted bytes: a corrupt sample is skipped, reported
                        where = f"{url}:{printable(sample.get('__key__', '?'))}"
                        skipped.append((where, f"{type(err).__name__}: {err}"))
                        log.warning("shards encode: skipping corrupt sample %s: %s", where, skipped[-1][1])
                        continue
                    writer.write({"__key__": sample["__key__"], "json": sample["json"], "mp4": sample["mp4"], MEMBER: member})
                    count += 1
                    bar.update(1)
            tmp.replace(out / name)
            shards.append(name)
        written += count
        if count:
            records.append({"split": shard_set.split, "domain": shard_set.domain, "shards": shards, "samples": count})
    bar.close()
    if not records:
        raise PandoraError(f"shards encode: no sample of {manifest.path} could be encoded ({len(skipped)} corrupt)")
    path = Path(manifest_path or out / "manifest.yaml")
    write_manifest(path, f"{manifest.name}-encoded", out, records, "shards encode", encoding=record)
    return {"samples": written, "skipped": skipped, "shards": sum(len(r["shards"]) for r in records), "manifest": str(path)}


def _encoded_sample(sample: dict, encode: Encoder, record: EncodingRecord) -> bytes:
    if "__error__" in sample:
        raise ValueError(sample["__error__"])
    meta = parse_meta(sample.get("json"))
    if not isinstance(sample.get("mp4"), (bytes, bytearray)):
        raise ValueError("the mp4 member is missing")
    clip = decode_mp4(sample["mp4"], size=(record.height, record.width))  # (T, H, W, 3), as the training loader scales
    frames = torch.from_numpy(np.ascontiguousarray(clip.transpose(0, 3, 1, 2)))
    texts = sample_texts(meta)
    given = given_frames(meta, record.cond_frames, len(frames))
    tensors = encode(frames, given, texts)
    return pack({**tensors, "vision_frames": torch.tensor(given, dtype=torch.int64)}, texts)
