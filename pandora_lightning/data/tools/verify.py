"""`pandora-lightning shards verify`: is every sample there, unchanged, and usable?

Reading alone cannot tell: a damaged tar header makes Python's tarfile end the shard silently, and
a flipped byte inside a clip may still decode. So verify reconciles what it reads with what was
written:
- `index.jsonl` beside the shards (written by `shards build` and `shards world`): every key it lists
  must be in its shard, with the same content hash; a key it lists but the shard lacks is *lost*
  (reported by key), a key the shard holds but the index lacks is *unexpected*;
- the manifest's `samples` per set: a set whose shards hold another number is reported.
Each sample's JSON is checked (`dataset.parse_meta`) and its video decoded (frame count, actions
inside the clip). The tar is walked with `tar.read_shard`, which finds damage anywhere and reads on
after it. Shards are checked in parallel worker processes.
"""
from __future__ import annotations

import json
import multiprocessing
from collections import Counter
from functools import partial
from pathlib import Path

from tqdm import tqdm

from pandora_lightning.data.dataset import parse_meta
from pandora_lightning.data.tar import printable, read_shard, sample_hash
from pandora_lightning.data.tools.checks import resolve_shards
from pandora_lightning.data.video import decode_mp4

INDEX = "index.jsonl"


def read_index(folder: Path) -> tuple[dict[str, dict[str, str | None]], list[str]]:
    """{shard name: {key: content hash or None}} from `folder/index.jsonl`, and the lines it could not use."""
    path = folder / INDEX
    shards: dict[str, dict[str, str | None]] = {}
    problems: list[str] = []
    if not path.is_file():
        return shards, problems
    for number, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            shard, key, digest = entry["shard"], entry["key"], entry.get("hash")
            if not all(isinstance(v, str) for v in (shard, key)) or not isinstance(digest, (str, type(None))):
                raise TypeError("shard, key and hash must be text")
        except (ValueError, KeyError, TypeError, RecursionError) as err:
            problems.append(f"{path} line {number} cannot be used ({type(err).__name__}): samples it lists are not checked")
            continue
        shards.setdefault(shard, {})[key] = digest
    return shards, problems


def check_sample(sample: dict, min_frames: int, digest: str | None = None) -> str | None:
    """Why the sample is corrupt, or None."""
    try:
        if "__error__" in sample:
            return str(sample["__error__"])
        meta = parse_meta(sample.get("json"))
        if not isinstance(sample.get("mp4"), (bytes, bytearray)):
            raise ValueError("the mp4 member is missing")
        clip = decode_mp4(sample["mp4"])
        count = meta.get("num_frames", len(clip))
        if len(clip) != count:
            raise ValueError(f"the clip has {len(clip)} frames, its JSON says {count}")
        if len(clip) < min_frames:
            raise ValueError(f"the clip has {len(clip)} frames, fewer than {min_frames}")
        for a in meta.get("actions", []):
            if a["end"] > len(clip):
                raise ValueError(f"action '{printable(a['text'])}' ends at frame {a['end']}, after the clip's {len(clip)} frames")
    except Exception as err:  # noqa: BLE001 - untrusted bytes: anything they break makes the sample corrupt
        return f"{type(err).__name__}: {err}"
    if digest is not None and sample_hash(sample) != digest:
        return f"its bytes differ from what {INDEX} recorded (content hash mismatch)"
    return None


def verify_shard(url: str, min_frames: int, expected: dict[str, str | None] | None, allow_commands: bool) -> dict:
    """One shard: samples read, and the corrupt / lost / unexpected samples and damaged regions in it."""
    out = {"url": url, "samples": 0, "corrupt": [], "lost": [], "damaged": []}
    seen: set[str] = set()
    for sample in read_shard(url, allow_commands):
        key = sample["__key__"]
        if "__error__" in sample and (key.startswith("bytes ") or key == "(shard)"):
            out["damaged"].append((url, key, sample["__error__"]))  # a region: whole samples may be in it
            continue
        out["samples"] += 1
        seen.add(key)
        reason = check_sample(sample, min_frames, expected.get(key) if expected else None)
        if expected is not None and key not in expected:
            reason = f"{reason}; and it is not in {INDEX}" if reason else f"not in {INDEX} (an unexpected sample)"
        if reason:
            out["corrupt"].append((url, printable(key), reason))
    for key in expected or {}:
        if key not in seen:
            out["lost"].append((url, printable(key), f"listed in {INDEX} but not in the shard (lost to a damaged or truncated tar)"))
    return out


def _expected(shards: list[tuple[str, str]], whole_folders: list[Path]) -> tuple[dict, list[str], list[tuple]]:
    """Per shard url, the keys its folder's index.jsonl expects (None: no index); index problems; and
    the keys of shards an index lists that are gone from a folder that was verified whole."""
    indexes: dict[Path, dict] = {}
    problems: list[str] = []
    expected: dict[str, dict | None] = {}
    for url, _ in shards:
        folder = Path(url.removeprefix("file://")).parent
        if folder not in indexes:
            indexes[folder], found = read_index(folder)
            problems += found
        index = indexes[folder]
        expected[url] = index.get(Path(url).name) if index else None
        if index and expected[url] is None:
            expected[url] = {}  # the index does not know this shard: all of its samples are unexpected
    missing = []
    for folder in whole_folders:
        present = {Path(u).name for u, _ in shards if Path(u).parent == folder}
        for name, keys in indexes.get(folder, {}).items():
            if name not in present:
                missing += [(str(folder / name), printable(k), f"listed in {INDEX}, but the shard file is gone") for k in keys]
    return expected, problems, missing


def verify_shards(sources: list[str], split: str | None = None, min_frames: int = 1, workers: int = 1,
                  progress: bool = True, allow_commands: bool = False) -> dict:
    """Decode and reconcile every sample; {"shards", "samples", "expected", "corrupt", "lost", "damaged",
    "sets", "index_problems"} with (shard, key or byte range, why) entries."""
    shards, counts = resolve_shards(sources, split, allow_commands, with_counts=True)
    whole = [Path(s) for s in sources if Path(s).is_dir()]
    expected, problems, missing = _expected(shards, whole)
    check = partial(_verify_one, min_frames=min_frames, allow_commands=allow_commands)
    report = {"shards": len(shards), "samples": 0, "corrupt": [], "lost": list(missing), "damaged": [],
              "sets": [], "index_problems": problems,
              "expected": sum(len(v) for v in expected.values() if v is not None) + len(missing)}
    read_per_set: Counter[str] = Counter()
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 and len(shards) > 1 else None
    try:
        jobs = [(url, expected[url]) for url, _ in shards]
        results = pool.imap(check, jobs) if pool else map(check, jobs)
        for (_, set_name), result in tqdm(zip(shards, results), total=len(shards), unit="shard", desc="shards verify",
                                          disable=not progress):
            report["samples"] += result["samples"]
            read_per_set[set_name] += result["samples"]
            for name in ("corrupt", "lost", "damaged"):
                report[name] += result[name]
    finally:
        if pool is not None:
            pool.terminate()
    for set_name, samples in counts.items():
        if read_per_set[set_name] != samples:
            report["sets"].append((set_name, samples, read_per_set[set_name]))
    return report


def _verify_one(job: tuple[str, dict | None], min_frames: int, allow_commands: bool) -> dict:
    url, expected = job
    return verify_shard(url, min_frames, expected, allow_commands)


def problem_lines(report: dict) -> list[str]:
    """One line per problem, then the summary line."""
    lines = [f"corrupt: {url}:{key}: {why}" for url, key, why in report["corrupt"]]
    lines += [f"lost: {url}:{key}: {why}" for url, key, why in report["lost"]]
    lines += [f"damaged: {url}: {where}: {why}" for url, where, why in report["damaged"]]
    lines += [f"short: set {name}: the manifest says {want} samples, its shards hold {got}"
              for name, want, got in report["sets"]]
    lines += [f"index: {p}" for p in report["index_problems"]]
    expected = f"{report['expected']} expected by {INDEX}, " if report["expected"] else ""
    parts = [f"{len(report[k])} {k}" for k in ("corrupt", "lost", "damaged") if report[k]]
    parts += [f"{len(report['sets'])} set(s) with the wrong sample count"] if report["sets"] else []
    parts += [f"{len(report['index_problems'])} unusable {INDEX} line(s)"] if report["index_problems"] else []
    lines.append(f"{expected}{report['samples']} samples read from {report['shards']} shards: "
                 + (", ".join(parts) if parts else "all sound"))
    return lines


def has_problems(report: dict) -> bool:
    return any(report[k] for k in ("corrupt", "lost", "damaged", "sets", "index_problems"))
