"""The index of `shards build`: JSONL or CSV rows naming videos, checked, each known by its content.

The columns are described in build.py. A bad row stops with its line number; two rows with the same
content (video, segment, texts, key) are refused, since they would make the same samples.
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import json
import re
from pathlib import Path

from pandora_lightning.errors import PandoraError

COLUMNS = ("video", "caption", "actions", "domain", "split", "start", "end", "key", "action", "action_start", "action_end")


def _safe(text: str) -> str:
    # webdataset splits a member name at its first dot: keys and shard names keep to [A-Za-z0-9_-]
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(text)).strip("_") or "x"


def _number(value, what: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None


def _row_actions(row: dict) -> list[dict]:
    actions = row.get("actions") or []
    if isinstance(actions, str):
        actions = json.loads(actions)
    if row.get("action"):
        actions = [*actions, {"text": row["action"], "start": row.get("action_start") or 0, "end": row.get("action_end")}]
    if not isinstance(actions, list):
        raise ValueError(f"actions must be a list, got {type(actions).__name__}")
    out = []
    for a in actions:
        if not isinstance(a, dict) or not isinstance(a.get("text"), str) or not a["text"].strip():
            raise ValueError(f"each action needs a non-empty 'text', got {a!r}")
        unit = "frame" if "start_frame" in a or "end_frame" in a else "s"
        keys = ("start_frame", "end_frame") if unit == "frame" else ("start", "end")
        start, end = _number(a.get(keys[0], 0), f"action {keys[0]}") or 0.0, _number(a.get(keys[1]), f"action {keys[1]}")
        if end is not None and end <= start:
            raise ValueError(f"action {a['text']!r} ends ({end}) before it starts ({start})")
        out.append({"text": a["text"].strip(), "start": start, "end": end, "unit": unit})
    return out


def parse_row(row: dict, number: int, default_domain: str) -> dict:
    """One index row -> a checked row dict; ValueError names what is wrong."""
    unknown = [k for k in row if k not in COLUMNS and k is not None]
    if unknown:
        close = difflib.get_close_matches(unknown[0], COLUMNS, n=1)
        raise ValueError(f"unknown column '{unknown[0]}'" + (f" (did you mean {close[0]}?)" if close else f"; known: {', '.join(COLUMNS)}"))
    if not row.get("video"):
        raise ValueError("no 'video' (the path of the video file)")
    start, end = _number(row.get("start"), "start") or 0.0, _number(row.get("end"), "end")
    if end is not None and end <= start:
        raise ValueError(f"end ({end}) is not after start ({start})")
    parsed = {
        "row": number,
        "video": str(row["video"]),
        "caption": str(row.get("caption") or ""),
        "actions": _row_actions(row),
        "domain": _safe(row.get("domain") or default_domain),
        "split": _safe(row.get("split") or "train"),
        "start": start,
        "end": end,
    }
    # A row is known by its content, not its position: a resumed build skips exactly the rows whose
    # clips are in finished shards, wherever they now stand in the index (settings are in build.json).
    content = {k: v for k, v in parsed.items() if k != "row"} | {"key": row.get("key") or None}
    parsed["row_id"] = hashlib.blake2b(json.dumps(content, sort_keys=True).encode(), digest_size=8).hexdigest()
    parsed["key"] = _safe(row.get("key") or f"{Path(str(row['video'])).stem}-{parsed['row_id']}")
    return parsed


def read_index(path: str | Path, default_domain: str = "default") -> list[dict]:
    """Rows of a JSONL or CSV index, checked; a bad row stops with its line number."""
    path = Path(path)
    if not path.is_file():
        raise PandoraError(f"shards build: index '{path}' does not exist")
    with path.open(newline="") as f:
        if path.suffix.lower() == ".csv":
            raw = [(i + 2, r) for i, r in enumerate(csv.DictReader(f))]  # line 1 is the header
        else:
            raw = []
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        raw.append((i, json.loads(line)))
                    except json.JSONDecodeError as err:
                        raise PandoraError(f"shards build: {path} line {i}: not JSON ({err})") from None
    rows, lines = [], {}
    for number, (line, row) in enumerate(raw):
        try:
            if not isinstance(row, dict):
                raise ValueError("a row must be a JSON object")
            rows.append(parse_row(row, number, default_domain))
        except (ValueError, json.JSONDecodeError) as err:
            raise PandoraError(f"shards build: {path} line {line}: {err}") from None
        if rows[-1]["row_id"] in lines:
            raise PandoraError(f"shards build: {path} line {line} repeats line {lines[rows[-1]['row_id']]} (the same "
                               f"video, segment, texts and key); drop one of them")
        lines[rows[-1]["row_id"]] = line
    if not rows:
        raise PandoraError(f"shards build: index '{path}' has no rows")
    return rows
