"""`pandora-lightning shards build`: a folder of videos with captions and actions -> WebDataset shards.

The index names the videos, one row per video (or per segment of one); JSONL (one object a line)
or CSV (a header row, then one row a video):

    video       path of the video file, relative to the index file (required)
    caption     what the video shows (the align stage's text)
    actions     [{"text", "start", "end"}] in seconds of the video, or
                [{"text", "start_frame", "end_frame"}] in its frames (end exclusive); in CSV a JSON
                list in the `actions` cell, or one action in `action`, `action_start`, `action_end` (seconds)
    domain      domain tag (default: --domain)
    split       train, val, ... (default: train)
    start, end  the segment of the video to use, in seconds (default: all of it)
    key         sample key prefix (default: the file's stem and the row number)

A row's segment is resampled to `fps` (each output frame is the last source frame shown at its
time), scaled to cover `size` and centre-cropped, and cut into clips of `frames` frames every
`stride` frames (a tail shorter than a clip is dropped). Each clip is re-encoded with the dataset
codec (`video.encode_mp4`) and gets the caption and the actions that overlap it, in clip frames.

Output, in `out`: shards `{split}-{domain}-{n:06d}.tar` of about `shard_bytes` each (the clips of
one row stay in one shard); `index.jsonl`, one line per sample saying which shard, video, row and
time it came from; `errors.jsonl`, the rows that could not be used and why; `build.json`, the
settings; and a manifest with each set's sample count and a weight proportional to it.

Videos are cut in `workers` processes; shards are written in index order by the main process. A
shard is written as `.tmp` and renamed when complete, after its index lines are on disk, so a
build that was interrupted resumes where it stopped: it keeps every finished shard, drops partial
ones and cuts only the rows that are not in a finished shard.
"""
from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import av
import numpy as np
import webdataset as wds
from tqdm import tqdm

from pandora_lightning.errors import PandoraError
from pandora_lightning.data.manifest import write_manifest
from pandora_lightning.data.tar import sample_hash
from pandora_lightning.data.tools.rows import read_index
from pandora_lightning.data.video import display_size, encode_mp4, frame_to_rgb, looks_like_video

TAR_OVERHEAD = 1536  # tar headers and padding of one sample's two members, roughly


@dataclass(frozen=True)
class BuildSettings:
    frames: int = 16  # frames per clip
    fps: float = 8.0
    size: tuple[int, int] = (32, 32)  # (H, W)
    stride: int = 0  # frames between clip starts; 0 = frames (back to back)
    max_clips: int = 0  # clips per row at most; 0 = all
    shard_bytes: int = 256 * 2**20
    domain: str = "default"

    def __post_init__(self):
        if self.frames < 1 or self.fps <= 0 or min(self.size) < 1 or self.stride < 0 or self.shard_bytes < 1:
            raise PandoraError(f"shards build: frames, fps, size and shard size must be positive, got {self}")


def _cover(frame: av.VideoFrame, size: tuple[int, int]) -> np.ndarray:
    """Scale to cover (H, W), then centre-crop: (H, W, 3) uint8, in the display orientation."""
    height, width = size
    shown_h, shown_w = display_size(frame)
    scale = max(height / shown_h, width / shown_w)
    h, w = max(height, round(shown_h * scale)), max(width, round(shown_w * scale))
    rgb = frame_to_rgb(frame, (h, w))
    top, left = (h - height) // 2, (w - width) // 2
    return rgb[top : top + height, left : left + width]


def resampled_frames(path: Path, fps: float, size: tuple[int, int], start: float, end: float | None) -> Iterator[np.ndarray]:
    """The video's frames at `fps` from `start` to `end` seconds, each the source frame shown then."""
    eps = 1e-6
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # the builder runs one process per core
        rate = float(stream.average_rate or 25)
        if start > 0:
            container.seek(int(start / stream.time_base), stream=stream, backward=True)
        k, prev, prev_t, decoded = 0, None, None, 0
        slot = lambda k: start + k / fps  # noqa: E731
        for i, frame in enumerate(container.decode(stream)):
            decoded = i + 1
            t = frame.time if frame.time is not None else i / rate
            while prev is not None and slot(k) < t - eps:  # slot k shows the previous frame
                if end is not None and slot(k) >= end - eps:
                    return
                yield _cover(prev, size)
                k += 1
            prev, prev_t = frame, t
        if prev is None:
            raise ValueError("no decodable frame in the segment")
        listed = stream.frames or 0
        if start <= 0 and decoded < listed and (end is None or prev_t + 1 / rate < end):
            raise Truncated(f"only {decoded} of the {listed} frames its container lists could be decoded")
        stop = prev_t + 1 / rate if end is None else min(end, prev_t + 1 / rate)
        while slot(k) < stop - eps:
            yield _cover(prev, size)
            k += 1


def _source_seconds(action: dict, rate: float) -> tuple[float, float]:
    start, end = action["start"], action["end"] if action["end"] is not None else float("inf")
    return (start / rate, end / rate) if action["unit"] == "frame" else (start, end)


class Truncated(PandoraError):
    """A video that ends before its container says (a kind of `shards build` failure)."""


def _cause(path: Path, err: Exception, opened: bool) -> str:
    """Which of the failure kinds `shards build` reports an error is."""
    if isinstance(err, Truncated) or (opened and isinstance(err, av.FFmpegError)):
        return "truncated or damaged"
    if isinstance(err, av.FFmpegError):
        try:
            return "truncated or damaged" if looks_like_video(path) else "not a video"
        except OSError:
            return "unreadable"
    return "unreadable" if isinstance(err, OSError) else "other"


def cut_row(settings: BuildSettings, root: Path, row: dict) -> tuple[int, list[dict], dict | None]:
    """Cut one row into encoded clips: (row, [{"__key__", "mp4", "json"}], None) or (row, [], {"cause", "error"})
    with cause one of: missing, unreadable, not a video, truncated or damaged, no video stream, too short."""
    path = Path(row["video"]) if Path(row["video"]).is_absolute() else root / row["video"]
    if not path.is_file():
        return row["row"], [], {"cause": "missing", "error": f"{path} does not exist"}
    opened = False
    try:
        with av.open(str(path)) as probe:
            if not probe.streams:  # e.g. an mp4 cut before its index (moov) was written
                return row["row"], [], {"cause": "truncated or damaged" if looks_like_video(path) else "not a video",
                                        "error": "the container holds no readable stream"}
            if not probe.streams.video:
                return row["row"], [], {"cause": "no video stream", "error": "the file holds no video stream"}
            rate = float(probe.streams.video[0].average_rate or 25)
        opened = True
        stride = settings.stride or settings.frames
        clips, window = [], []
        for index, frame in enumerate(resampled_frames(path, settings.fps, settings.size, row["start"], row["end"])):
            window = [*window[-(settings.frames - 1):], frame] if settings.frames > 1 else [frame]
            first = index - settings.frames + 1
            if first < 0 or first % stride:
                continue
            clips.append(_clip_sample(settings, row, rate, first, np.stack(window)))
            if settings.max_clips and len(clips) >= settings.max_clips:
                break
        if not clips:
            return row["row"], [], {"cause": "too short", "error": f"the segment is shorter than one clip of "
                                                                   f"{settings.frames} frames at {settings.fps:g} fps"}
        return row["row"], clips, None
    except (ValueError, av.FFmpegError, OSError) as err:
        return row["row"], [], {"cause": _cause(path, err, opened), "error": f"{type(err).__name__}: {err}"}


def _clip_sample(settings: BuildSettings, row: dict, rate: float, first: int, frames: np.ndarray) -> dict:
    fps, n = settings.fps, settings.frames
    clip_start = row["start"] + first / fps
    actions = []
    for a in row["actions"]:
        begin, finish = _source_seconds(a, rate)
        s = max(0, round((begin - clip_start) * fps))
        e = min(n, round((finish - clip_start) * fps)) if finish != float("inf") else n
        if e > s:
            actions.append({"text": a["text"], "start": s, "end": e})
    meta = {
        "caption": row["caption"], "actions": actions, "domain": row["domain"], "split": row["split"],
        "source": row["video"], "row": row["row"], "clip_start": round(clip_start, 4),
        "fps": fps, "num_frames": n, "size": list(settings.size),
    }
    key = f"{row['key']}-{first:06d}"
    return {"__key__": key, "mp4": encode_mp4(frames, max(1, round(fps))), "json": json.dumps(meta).encode("utf-8")}


class _ShardWriter:
    """Shards of one (split, domain): `.tmp` while open, renamed once its index lines are written."""

    def __init__(self, out: Path, split: str, domain: str, next_number: int, shard_bytes: int, index_file, mtime: int):
        self.out, self.split, self.domain, self.number = out, split, domain, next_number
        self.shard_bytes, self.index_file, self.mtime = shard_bytes, index_file, mtime
        self.writer, self.size, self.lines, self.finished = None, 0, [], []

    def add(self, row: dict, clips: list[dict]) -> None:
        row_bytes = sum(len(c["mp4"]) + len(c["json"]) + TAR_OVERHEAD for c in clips)
        if self.writer is not None and self.size + row_bytes > self.shard_bytes:
            self.close()
        if self.writer is None:
            self.name = f"{self.split}-{self.domain}-{self.number:06d}.tar"
            # One whole-second time for every member: plain ustar headers (a float time needs a pax
            # header per member, which doubles tar parsing when reading) and the same bytes on resume.
            self.writer = wds.TarWriter(str(self.out / f"{self.name}.tmp"), mtime=self.mtime)
        for clip in clips:
            self.writer.write(clip)
            meta = json.loads(clip["json"])
            self.lines.append({"key": clip["__key__"], "shard": self.name, "split": self.split, "domain": self.domain,
                               "video": row["video"], "row": row["row"], "row_id": row["row_id"],
                               "clip_start": meta["clip_start"], "hash": sample_hash(clip)})
        self.size += row_bytes

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.index_file.writelines(json.dumps(line) + "\n" for line in self.lines)
        self.index_file.flush()
        (self.out / f"{self.name}.tmp").rename(self.out / self.name)
        self.finished.append((self.name, len(self.lines)))
        self.writer, self.size, self.lines = None, 0, []
        self.number += 1


def _previous_build(out: Path, settings: BuildSettings, index: Path) -> tuple[list[dict], int]:
    """Index lines of the finished shards of an earlier (interrupted) build into `out`, and its time."""
    for partial_shard in out.glob("*.tar.tmp"):
        partial_shard.unlink()
    recorded = out / "build.json"
    wanted = {"index": str(index.resolve()), **asdict(settings), "size": list(settings.size)}
    mtime = int(time.time())
    if recorded.is_file():
        before = json.loads(recorded.read_text())
        if before["settings"] != wanted:
            changed = sorted(k for k in wanted if before["settings"].get(k) != wanted[k])
            raise PandoraError(
                f"shards build: {out} holds shards built with other settings ({', '.join(changed)}); use a new --out"
            )
        mtime = before["mtime"]
    recorded.write_text(json.dumps({"settings": wanted, "mtime": mtime}, indent=2) + "\n")
    lines_file = out / "index.jsonl"
    if not lines_file.is_file():
        return [], mtime
    lines = [json.loads(line) for line in lines_file.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if (out / line["shard"]).is_file()]
    if any("row_id" not in line for line in kept):
        raise PandoraError(f"shards build: {out} was built by an older version that knew rows by position; use a new --out")
    lines_file.write_text("".join(json.dumps(line) + "\n" for line in kept))
    return kept, mtime


def build_shards(
    index: str | Path, out: str | Path, settings: BuildSettings, workers: int = 1, manifest: str | Path | None = None,
    name: str | None = None, progress: bool = True,
) -> dict:
    """Build (or finish building) shards from `index` into `out`; returns a summary."""
    started = time.perf_counter()
    index, out = Path(index), Path(out)
    rows = read_index(index, settings.domain)
    out.mkdir(parents=True, exist_ok=True)
    kept, mtime = _previous_build(out, settings, index)
    done_rows = {line["row_id"] for line in kept}
    todo = [r for r in rows if r["row_id"] not in done_rows]
    next_number: dict[tuple[str, str], int] = {}
    for line in kept:
        pair = (line["split"], line["domain"])
        next_number[pair] = max(next_number.get(pair, 0), int(line["shard"].rsplit("-", 1)[1].split(".")[0]) + 1)
    writers: dict[tuple[str, str], _ShardWriter] = {}
    errors, clips_written = [], 0
    cut = partial(cut_row, settings, index.parent)
    by_row = {r["row"]: r for r in todo}
    with (out / "index.jsonl").open("a") as index_file, (out / "errors.jsonl").open("w") as errors_file:
        pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
        try:
            results = pool.imap(cut, todo, chunksize=1) if pool else map(cut, todo)
            bar = tqdm(results, total=len(todo), unit="video", desc="shards build", disable=not progress)
            for number, clips, error in bar:
                row = by_row[number]
                if error is not None:
                    errors.append({"row": number, "video": row["video"], **error})
                    errors_file.write(json.dumps(errors[-1]) + "\n")
                    bar.set_postfix(clips=clips_written, errors=len(errors), refresh=False)
                    continue
                pair = (row["split"], row["domain"])
                if pair not in writers:
                    writers[pair] = _ShardWriter(out, *pair, next_number.get(pair, 0), settings.shard_bytes, index_file, mtime)
                writers[pair].add(row, clips)
                clips_written += len(clips)
                bar.set_postfix(clips=clips_written, errors=len(errors), refresh=False)
            for writer in writers.values():
                writer.close()
        finally:
            if pool is not None:
                pool.terminate()
    summary = _summarise(out, kept, errors, rows, clips_written, time.perf_counter() - started)
    manifest_path = Path(manifest) if manifest else out / "manifest.yaml"
    write_manifest(manifest_path, name or out.name, out, summary["sets"], written_by="shards build")
    summary["manifest"] = str(manifest_path)
    return summary


def cause_counts(errors: list[dict]) -> str:
    """'truncated or damaged: 2, not a video: 1'."""
    counts: dict[str, int] = {}
    for error in errors:
        counts[error["cause"]] = counts.get(error["cause"], 0) + 1
    return ", ".join(f"{cause}: {n}" for cause, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def shard_patterns(names: list[str]) -> list[str]:
    """Runs of consecutive shard numbers as brace patterns: a-000000.tar ... a-000009.tar -> a-{000000..000009}.tar."""
    numbered: dict[str, list[str]] = {}
    for name in names:
        prefix, number = name.removesuffix(".tar").rsplit("-", 1)
        numbered.setdefault(prefix, []).append(number)
    patterns = []
    for prefix, numbers in numbered.items():
        numbers.sort()
        run = [numbers[0]]
        for number in [*numbers[1:], None]:
            if number is not None and int(number) == int(run[-1]) + 1:
                run.append(number)
                continue
            patterns.append(f"{prefix}-{run[0]}.tar" if len(run) == 1 else f"{prefix}-{{{run[0]}..{run[-1]}}}.tar")
            run = [number]
    return patterns


def _summarise(out: Path, kept: list[dict], errors: list[dict], rows: list[dict], clips_written: int, seconds: float) -> dict:
    lines = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines() if line.strip()]
    sets: dict[tuple[str, str], dict] = {}
    for line in lines:
        entry = sets.setdefault((line["split"], line["domain"]), {"split": line["split"], "domain": line["domain"], "shards": [], "samples": 0})
        entry["samples"] += 1
        if line["shard"] not in entry["shards"]:
            entry["shards"].append(line["shard"])
    for entry in sets.values():
        entry["shards"] = shard_patterns(entry["shards"])
    if not sets:
        raise PandoraError(f"shards build: no clip could be cut from any of the {len(rows)} rows ({cause_counts(errors)}); "
                           f"see {out / 'errors.jsonl'}")
    return {
        "rows": len(rows), "rows_already_done": len({line['row_id'] for line in kept}), "errors": len(errors),
        "failed": errors,
        "clips_written": clips_written, "samples": len(lines), "shards": len({line["shard"] for line in lines}),
        "seconds": round(seconds, 2), "clips_per_s": round(clips_written / seconds, 2) if seconds > 0 else 0.0,
        "sets": sorted(sets.values(), key=lambda s: (s["split"], s["domain"])),
    }
