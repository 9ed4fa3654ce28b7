"""In-memory MP4 coding and image helpers for tiny RGB clips.

Clips are ``(T, H, W, 3) uint8`` RGB arrays throughout.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image

# Dataset clips: H.264 at qp 0 (lossless in YUV) with full-resolution chroma
# (yuv444p). 4:2:0 would halve the chroma of a 32x32 frame and smear object
# colours into the background; the only remaining loss is the RGB<->YUV
# rounding (measured at <= 2 levels per channel).
_DATA_PIX_FMT = "yuv444p"
_DATA_OPTIONS = {"qp": "0", "preset": "ultrafast", "threads": "1"}
# Viewing clips: yuv420p + crf 18 so ordinary players accept them.
_VIEW_PIX_FMT = "yuv420p"
_VIEW_OPTIONS = {"crf": "18", "preset": "fast"}
_LOCAL = threading.local()


def _check_clip(frames: np.ndarray) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise ValueError(f"frames must have shape (T, H, W, 3) with T >= 1, got {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(
            f"frames must be uint8 RGB, got dtype {arr.dtype}; "
            "convert with np.clip(x, 0, 255).astype(np.uint8)"
        )
    return np.ascontiguousarray(arr)


def _encode(target, frames: np.ndarray, fps: int, pix_fmt: str, options: dict[str, str]) -> None:
    if fps < 1:
        raise ValueError(f"fps={fps} must be a positive integer")
    with av.open(target, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.options = dict(options)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush delayed frames
            container.mux(packet)


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """Encode ``(T, H, W, 3) uint8`` frames to near-lossless MP4 bytes."""
    frames = _check_clip(frames)
    buf = io.BytesIO()
    _encode(buf, frames, fps, _DATA_PIX_FMT, _DATA_OPTIONS)
    return buf.getvalue()


def _reformatter() -> VideoReformatter:
    # One reformatter per thread and process: it caches its swscale context, and building that
    # context for every frame (what `frame.to_ndarray(format=...)` does) costs more than decoding
    # a small frame. Forked data-loader workers make their own.
    if getattr(_LOCAL, "pid", None) != os.getpid():
        _LOCAL.pid, _LOCAL.reformatter = os.getpid(), VideoReformatter()
    return _LOCAL.reformatter


def quarter_turns(frame: av.VideoFrame) -> int:
    """Counter-clockwise quarter turns the stream's display matrix asks for (0-3).

    Phones store a portrait clip as landscape frames plus a rotation in the container; PyAV's
    decode does not apply it, so every decode of a user's video must.
    """
    try:
        degrees = frame.rotation
    except (AttributeError, ValueError):
        return 0
    return round(degrees / 90) % 4 if degrees else 0


def display_size(frame: av.VideoFrame) -> tuple[int, int]:
    """(H, W) of the frame as it is meant to be shown (after its display rotation)."""
    return (frame.width, frame.height) if quarter_turns(frame) % 2 else (frame.height, frame.width)


def frame_to_rgb(frame: av.VideoFrame, size: tuple[int, int] | None = None) -> np.ndarray:
    """One decoded frame -> ``(H, W, 3) uint8`` RGB as it is meant to be shown (display rotation
    applied), scaled to ``size=(H, W)`` when given."""
    turns = quarter_turns(frame)
    height, width = size if size is not None else display_size(frame)
    if turns % 2:
        height, width = width, height  # scale in the stored orientation, then turn
    # threads=1: swscale's own threads cost more than they save on small frames, and they do not
    # survive a fork (a forked worker touching a threaded context waits for them forever).
    out = _reformatter().reformat(
        frame, format="rgb24", width=width, height=height, interpolation="AREA", threads=1
    ).to_ndarray()
    return np.ascontiguousarray(np.rot90(out, turns)) if turns else out


# First bytes of video containers: a file that has them but cannot be opened is a damaged video,
# one that has none is not a video at all.
_SIGNATURES = ((4, (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot")),  # MP4 / MOV
               (0, (b"\x1a\x45\xdf\xa3", b"RIFF", b"OggS", b"FLV", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")))


def looks_like_video(path: str | Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(200)
    ts = len(head) > 188 and head[0] == head[188] == 0x47  # MPEG-TS sync bytes
    return ts or any(head[at : at + len(sig)] == sig for at, sigs in _SIGNATURES for sig in sigs)


def decode_mp4(
    data: bytes, num_frames: int | None = None, start: int = 0, size: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode MP4 bytes to ``(T, H, W, 3) uint8``: at most ``num_frames`` frames from frame ``start``.

    Decoding stops after the last frame needed; frames before ``start`` are decoded (the codec
    needs them) but never converted to RGB. ``size=(H, W)`` scales frames of another size while
    converting. One decoder thread: clips are small and many are decoded in parallel by the
    data-loader workers, so FFmpeg's own threads only add start-up cost.
    """
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be >= 1 or None (all frames)")
    if start < 0:
        raise ValueError(f"start={start} must be >= 0")
    if not data:
        raise ValueError("decode_mp4 got empty data; expected the bytes of an MP4 file")
    out: list[np.ndarray] = []
    try:
        with av.open(io.BytesIO(bytes(data)), mode="r") as container:
            if not container.streams.video:
                raise ValueError("MP4 data has no video stream")
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            for index, frame in enumerate(container.decode(stream)):
                if index < start:
                    continue
                out.append(frame_to_rgb(frame, size))
                if num_frames is not None and len(out) >= num_frames:
                    break
    except av.FFmpegError as err:
        raise ValueError(f"could not decode MP4 data ({len(data)} bytes): {err}") from err
    if not out:
        raise ValueError(f"MP4 data ({len(data)} bytes) contains no decodable video frames after frame {start}")
    return np.stack(out)


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscale of ``(..., H, W, C)`` by an integer ``scale``."""
    if scale < 1:
        raise ValueError(f"scale={scale} must be a positive integer")
    return np.repeat(np.repeat(frames, scale, axis=-3), scale, axis=-2)


def write_mp4(path: str | Path, frames: np.ndarray, fps: int, scale: int = 1) -> None:
    """Write a viewable MP4 (yuv420p), nearest-neighbour upscaled by ``scale``.

    yuv420p needs even sizes, so an odd height/width is padded by repeating
    the last row/column.
    """
    frames = upscale(_check_clip(frames), scale)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    _encode(str(path), frames, fps, _VIEW_PIX_FMT, _VIEW_OPTIONS)


def contact_sheet(rows: list[np.ndarray], scale: int = 4, gap: int = 2) -> np.ndarray:
    """Lay clips out as rows of frames: ``(H', W', 3) uint8`` on a white canvas.

    ``rows``: clips ``(T_i, H, W, 3) uint8`` of equal ``H, W``; shorter rows
    leave blank cells. Each frame is upscaled by ``scale`` and cells are
    separated by ``gap`` px.
    """
    if not rows:
        raise ValueError("contact_sheet needs at least one clip in rows")
    clips = [_check_clip(r) for r in rows]
    if len({c.shape[1:] for c in clips}) != 1:
        raise ValueError(f"all clips must share (H, W, 3), got {[c.shape[1:] for c in clips]}")
    if gap < 0:
        raise ValueError(f"gap={gap} must be >= 0")
    h, w = clips[0].shape[1] * scale, clips[0].shape[2] * scale
    cols = max(c.shape[0] for c in clips)
    sheet = np.full((gap + len(clips) * (h + gap), gap + cols * (w + gap), 3), 255, np.uint8)
    for i, clip in enumerate(clips):
        for j, frame in enumerate(upscale(clip, scale)):
            y, x = gap + i * (h + gap), gap + j * (w + gap)
            sheet[y : y + h, x : x + w] = frame
    return sheet


def save_png(path: str | Path, image: np.ndarray) -> None:
    """Save an ``(H, W, 3) uint8`` image as PNG."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got shape {arr.shape} dtype {arr.dtype}")
    Image.fromarray(arr).save(str(path), format="PNG")
