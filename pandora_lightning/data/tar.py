"""Reading shards you can rely on: every member read or its loss reported, commands only on opt-in.

Python's `tarfile` (and so webdataset's reader) ends a shard silently at the first damaged header:
every sample after it vanishes. `read_shard` walks the tar itself, one 512-byte block at a time:
- a block that is not a valid header (bad checksum) starts a *damaged region*; the reader skips
  block by block to the next valid header and goes on, so damage anywhere in a tar is found and
  the samples after it are still read;
- zero blocks are the end-of-archive marker only if nothing but zeros follows;
- a member cut short, or a shard that ends without the marker, is a truncation.
Members are grouped into samples by key as webdataset does (`key.ext`, key = the name up to the
first dot of the file name). A sample that lost members comes with `"__error__"` (a damaged region
next to it is its error, so it is counted once); a region that took whole samples with it comes as
one item `{"__key__": "bytes A-B", "__error__": ...}`; `shards verify` names those samples from
index.jsonl.

Shard sources. Local files (and `file://`) are opened directly. Anything else (`pipe:cmd`,
`http://`, `s3://`, ...) runs a command (a shell command, or curl/aws through webdataset's
`gopen`), so it is refused unless the caller opts in (`data.allow_commands: true` in a recipe,
`--allow-commands` on the command line).
"""
from __future__ import annotations

import hashlib
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pandora_lightning.errors import PandoraError

BLOCK = 512
MAX_MEMBER_BYTES = 2**31  # a larger member is taken for a damaged size field
SAMPLE_MEMBERS = ("json", "mp4")  # what a project sample holds; a sample without one of them is incomplete


def is_command(url: str) -> bool:
    """Whether opening `url` runs a command (pipe:, or a remote URL fetched through curl/aws/...)."""
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file://"))


def check_sources(urls: Iterable[str], allow_commands: bool, what: str) -> None:
    """Refuse command sources unless the user opted in; names the first one and the switch."""
    for url in urls:
        if is_command(url) and not allow_commands:
            raise PandoraError(
                f"{what} names '{shorten(url)}', which runs a command to read it (pipe: runs a shell command, URLs "
                f"run curl and the like); it is refused unless you opt in with data.allow_commands=true "
                f"(or --allow-commands)"
            )


def shorten(text: str, limit: int = 80) -> str:
    text = printable(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(text: str) -> str:
    """`text` with control characters escaped, so a key from a shard cannot break a one-line message."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def open_source(url: str, allow_commands: bool = False):
    """A binary stream of the shard at `url` (see the module docstring for what needs opting in)."""
    check_sources([url], allow_commands, "shard source")
    if not is_command(url):
        return open(url.removeprefix("file://"), "rb")  # noqa: SIM115 - closed by the caller
    import webdataset as wds

    return wds.gopen(url, "rb")


def safe_key(key: str, limit: int = 80) -> str:
    """A file-name-safe form of a sample key ([A-Za-z0-9_-] only), unique per key: a key that had to
    change gets a short hash of the original, so `../../x` and `x` never share a file."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", str(key)).strip("_-")[:limit]
    if cleaned and cleaned == key:
        return cleaned
    digest = hashlib.blake2b(str(key).encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()
    return f"{cleaned or 'sample'}-{digest}"


def sample_hash(sample: dict) -> str:
    """Content hash of a sample's members (what index.jsonl stores and `shards verify` compares)."""
    h = hashlib.blake2b(digest_size=16)
    for ext in sorted(k for k in sample if not k.startswith("__")):
        data = sample[ext]
        h.update(f"{ext}:{len(data)}:".encode())
        h.update(data)
    return h.hexdigest()


@dataclass
class _Member:
    name: str
    data: bytes


@dataclass
class _Damage:
    start: int
    end: int
    reason: str

    def where(self) -> str:
        return f"bytes {self.start}-{self.end}"


def _header(buf: bytes):
    """A TarInfo, "zero" for an all-zero block, or None for a block that is not a valid header."""
    try:
        return tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")
    except tarfile.EOFHeaderError:
        return "zero"
    except tarfile.HeaderError:
        return None


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header ("<len> key=value\\n" records)."""
    pos, path = 0, None
    while pos < len(data):
        match = re.match(rb"(\d+) ", data[pos : pos + 24])
        length = int(match.group(1)) if match else 0
        if length <= len(match.group(0) if match else b"") or pos + length > len(data):
            raise ValueError("bad pax record")
        key, _, value = data[pos + len(match.group(0)) : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos += length
    return path


def _events(stream) -> Iterator[_Member | _Damage]:
    """Members and damaged regions of a tar stream, in order (see the module docstring)."""
    pos, name = 0, None  # name: from a pax / GNU long-name header, for the next member
    bad = zeros = None  # start of the current run of invalid / zero blocks
    while True:
        buf = stream.read(BLOCK)
        here, pos = pos, pos + len(buf)
        if not buf:
            break
        header = _header(buf) if len(buf) == BLOCK else None
        if header == "zero":
            zeros = here if zeros is None else zeros
            continue
        if header is None:
            if len(buf) < BLOCK and zeros is not None and bad is None and not buf.strip(b"\0"):
                break  # zero padding that stops short of a block: still a clean end
            bad = (here if zeros is None else zeros) if bad is None else bad
            zeros = None
            continue
        if bad is not None or zeros is not None:
            start = min(x for x in (bad, zeros) if x is not None)
            why = "unreadable tar blocks (a damaged header)" if bad is not None else "zero blocks inside the archive"
            yield _Damage(start, here, why)
            bad = zeros = None
        size = header.size
        if not 0 <= size <= MAX_MEMBER_BYTES:
            yield _Damage(here, pos, f"a header with an impossible size ({size})")
            continue
        data = stream.read(-(-size // BLOCK) * BLOCK)
        pos += len(data)
        if len(data) < size:
            yield _Damage(here, pos, f"member '{printable(header.name)}' is cut short ({len(data)} of {size} bytes): truncated")
            return
        data = data[:size]
        if header.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            try:
                name = _pax_path(data) or name
            except ValueError:
                yield _Damage(here, pos, "an unreadable pax header")
            continue
        if header.type == tarfile.GNUTYPE_LONGNAME:
            name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if header.type in tarfile.REGULAR_TYPES:
            yield _Member(name or header.name, data)
        name = None
    if bad is not None:
        yield _Damage(bad, pos, "unreadable tar blocks at the end (a damaged header, or garbage)")
    elif zeros is None:
        yield _Damage(pos, pos, "the shard ends without the tar end-of-archive marker: truncated")


def split_name(name: str) -> tuple[str | None, str | None]:
    """webdataset's rule: (key, extension) with key = the path up to the first dot of the file name."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2).lower()) if match else (None, None)


def _group(events: Iterable[_Member | _Damage], url: str, expect: tuple[str, ...]) -> Iterator[dict]:
    current: dict | None = None
    damage: _Damage | None = None  # a region not yet given to a sample

    def region(d: _Damage) -> dict:
        return {"__key__": d.where(), "__url__": url, "__error__": f"{d.reason}; any sample stored there is lost"}

    def close(sample: dict) -> Iterator[dict]:
        before = sample.pop("_damage", None)
        missing = [e for e in expect if e not in sample]
        if missing and "__error__" not in sample:
            lost = f"no {'/'.join(missing)} member"
            sample["__error__"] = f"{lost} ({before.reason}, {before.where()})" if before else lost
        elif before is not None:
            yield region(before)
        yield sample

    for event in events:
        if isinstance(event, _Damage):
            if damage is not None:
                yield region(damage)
                damage = None
            if current is not None:
                if any(e not in current for e in expect):  # the damage took this sample's later members
                    current["_damage"], event = event, None
                yield from close(current)
                current = None
            damage = event
            continue
        key, ext = split_name(event.name)
        if key is None or event.name.startswith("__"):
            continue
        if current is not None and key == current["__key__"]:
            if ext in current:
                current["__error__"] = f"member '{printable(event.name)}' appears twice"
            current[ext] = event.data
            continue
        if current is not None:
            yield from close(current)
        current = {"__key__": key, "__url__": url, ext: event.data}
        if damage is not None:
            current["_damage"], damage = damage, None
    if current is not None:
        yield from close(current)
    if damage is not None:
        yield region(damage)


def read_shard(url: str, allow_commands: bool = False, expect: tuple[str, ...] = SAMPLE_MEMBERS) -> Iterator[dict]:
    """Samples {"__key__", "__url__", ext: bytes} of one shard, in order; a damaged or lost part comes
    as a sample with "__error__" (see the module docstring). A shard that cannot be opened at all
    is one such item with key "(shard)"."""
    try:
        stream = open_source(url, allow_commands)
    except OSError as err:
        yield {"__key__": "(shard)", "__url__": url, "__error__": f"cannot be opened: {err.strerror or err}"}
        return
    with stream:
        try:
            yield from _group(_events(stream), url, expect)
        except OSError as err:  # a read error (or a failing command) part way
            yield {"__key__": "(shard)", "__url__": url, "__error__": f"read failed part way: {err}"}


def read_shards(urls: Iterable[str], allow_commands: bool = False, expect: tuple[str, ...] = SAMPLE_MEMBERS) -> Iterator[dict]:
    for url in urls:
        yield from read_shard(url, allow_commands, expect)

