"""500 damaged shards (byte flips, truncations, header damage, wrong JSON, huge and negative numbers)
through `shards verify`, the training loader and `score`'s reader: no unhandled exception anywhere,
and verify names every damaged sample."""
import io
import json
import random
import tarfile
import time

import numpy as np
import webdataset as wds

from pandora_lightning.data.config import DataConfig
from pandora_lightning.data.dataset import iterate_split
from pandora_lightning.data.loader import training_loader
from pandora_lightning.data.manifest import load_manifest
from pandora_lightning.data.tar import sample_hash
from pandora_lightning.data.tools.verify import verify_shards
from pandora_lightning.data.video import encode_mp4
from pandora_lightning.errors import PandoraError

BLOCK = 512
BAD_JSON = [
    b"not json", b"[1, 2, 3]", b'"text"', b"null", b"{", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000,
    {"caption": 5}, {"actions": "move left"}, {"actions": None}, {"actions": [{"start": 0, "end": 4}]},
    {"actions": [{"text": "", "start": 0, "end": 4}]}, {"actions": [{"text": "x", "start": 4, "end": 2}]},
    {"actions": [{"text": "x", "start": "2", "end": 4}]}, {"actions": [1, 2]}, {"domain": ["a"]},
    {"actions": [{"text": "x", "start": True, "end": 4}]}, {"num_frames": "six"},
]
NUMBERS = [10**30, -(10**30), -5, -1, 1e308, -1e308, float("inf"), float("-inf"), float("nan"), 2**63, 0, 1.5]


def base_samples() -> list[dict]:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(4):
        frames = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
        meta = {"caption": f"clip {i}", "actions": [{"text": "move left", "start": 2, "end": 6}], "domain": "d",
                "num_frames": 6, "fps": 8}
        samples.append({"__key__": f"k{i}", "mp4": encode_mp4(frames, 8), "json": json.dumps(meta).encode()})
    return samples


def write_tar(samples: list[dict]) -> bytes:
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
    return buf.getvalue()


def damaged_by_bytes(data: bytes, positions: list[int]) -> set[str]:
    """Keys whose header or data holds one of `positions` (byte 155 of a header, after the checksum's
    NUL, takes no part in the checksum; the padding after a member's data holds nothing)."""
    out = set()
    for m in tarfile.open(fileobj=io.BytesIO(data), mode="r:"):
        key = m.name.split(".", 1)[0]
        for p in positions:
            if (m.offset <= p < m.offset + BLOCK and p - m.offset != 155) or m.offset_data <= p < m.offset_data + m.size:
                out.add(key)
    return out


def mutations(samples: list[dict], n: int, seed: int = 0):
    """(kind, shard bytes, keys of the samples it damages)."""
    rng = random.Random(seed)
    data = write_tar(samples)
    members = list(tarfile.open(fileobj=io.BytesIO(data), mode="r:"))
    ends = {}
    for m in members:
        ends[m.name.split(".", 1)[0]] = m.offset_data + m.size
    for _ in range(n):
        kind = rng.choice(["flip"] * 3 + ["truncate"] * 2 + ["header"] * 2 + ["json"] * 2 + ["numbers"])
        if kind == "flip":
            positions = [rng.randrange(len(data)) for _ in range(rng.randint(1, 3))]
            out = bytearray(data)
            for p in positions:
                out[p] ^= 1 << rng.randrange(8)
            yield kind, bytes(out), damaged_by_bytes(data, positions)
        elif kind == "truncate":
            cut = rng.randrange(len(data))
            yield kind, data[:cut], {k for k, end in ends.items() if end > cut}
        elif kind == "header":
            m = rng.choice(members)
            out = bytearray(data)
            how = rng.choice(["zero", "garble", "size"])
            if how == "zero":
                out[m.offset : m.offset + BLOCK] = bytes(BLOCK)
            elif how == "garble":
                out[m.offset : m.offset + BLOCK] = bytes(rng.getrandbits(8) for _ in range(BLOCK))
            else:
                out[m.offset + 124 : m.offset + 136] = b"77777777777\0"
            yield f"header-{how}", bytes(out), {m.name.split(".", 1)[0]}
        else:
            i = rng.randrange(len(samples))
            meta = json.loads(samples[i]["json"])
            if kind == "json":
                bad = rng.choice(BAD_JSON)
                raw = bad if isinstance(bad, bytes) else json.dumps({**meta, **bad}).encode()
            else:
                field = rng.choice(["start", "end", "num_frames", "fps"])
                target = meta["actions"][0] if field in ("start", "end") else meta
                target[field] = rng.choice(NUMBERS)
                raw = json.dumps(meta).encode()  # inf and NaN are written as Infinity / NaN, which Python reads
            changed = [dict(s) for s in samples]
            changed[i]["json"] = raw
            yield kind, write_tar(changed), {samples[i]["__key__"]}


def test_fuzz_500_damaged_shards(tmp_path):
    samples = base_samples()
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "index.jsonl").write_text("".join(
        json.dumps({"key": s["__key__"], "shard": "a.tar", "hash": sample_hash(s)}) + "\n" for s in samples))
    (shards / "b.tar").write_bytes(write_tar([{**s, "__key__": f"b{s['__key__']}"} for s in samples]))
    (tmp_path / "m.yaml").write_text(
        f"root: {shards}\nsets:\n- {{split: train, domain: a, shards: [a.tar], weight: 0.5, samples: 4}}\n"
        "- {split: train, domain: b, shards: [b.tar], weight: 0.5, samples: 4}\n")
    data = DataConfig(batch_size=2, num_workers=0, shuffle_buffer=1, max_bad_fraction=1.0)
    (shards / "a.tar").write_bytes(write_tar(samples))
    manifest = load_manifest(tmp_path / "m.yaml")
    started, kinds, missed, errors = time.perf_counter(), {}, [], []
    for number, (kind, shard, damaged) in enumerate(mutations(samples, 500)):
        kinds[kind] = kinds.get(kind, 0) + 1
        (shards / "a.tar").write_bytes(shard)
        try:
            report = verify_shards([str(shards / "a.tar")], progress=False)
            named = {key for _, key, _ in report["corrupt"] + report["lost"]}
            if not damaged <= named:
                missed.append((number, kind, damaged - named))
            loader = training_loader(manifest, data, "action", 4, 2, (8, 8), seed=number)
            batches = iter(loader)
            for _ in range(2):
                next(batches)
            list(iterate_split(manifest, "train", per_domain=4, skipped=[]))
        except PandoraError as err:  # a one-line verdict on the data is a handled outcome
            assert "\n" not in str(err)
        except Exception as err:  # noqa: BLE001 - what the test is looking for
            errors.append((number, kind, f"{type(err).__name__}: {err}"))
    print(f"fuzz: {sum(kinds.values())} inputs {kinds} in {time.perf_counter() - started:.1f} s; "
          f"{len(errors)} unhandled exceptions, {len(missed)} damaged samples not named by verify")
    assert sum(kinds.values()) == 500 and set(kinds) >= {"flip", "truncate", "json", "numbers", "header-zero"}
    assert errors == []
    assert missed == []
