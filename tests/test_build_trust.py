"""`shards build` you can rely on: rotation applied, failures named and not swallowed, resume by content."""
import json

import av
import numpy as np
import pytest

from pandora_lightning.cli import main
from pandora_lightning.data.tools.build import BuildSettings, build_shards
from pandora_lightning.data.video import decode_mp4, write_mp4
from tests.test_shards import _samples

FPS = 8


def _video(path, frames=8, height=16, width=32, rotation=0):
    """A clip whose stored frames have a white block in the top-left corner; `rotation` writes a display
    matrix into the container (counter-clockwise degrees, as a phone does for portrait clips)."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        if rotation:
            stream.set_display_rotation(rotation)
        for _ in range(frames):
            frame = np.zeros((height, width, 3), np.uint8)
            frame[:6, :6] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _corner(frame):
    """Which corner of an (H, W, 3) frame is white."""
    h, w = frame.shape[:2]
    corners = {"top-left": frame[: h // 4, : w // 4], "top-right": frame[: h // 4, -w // 4 :],
               "bottom-left": frame[-h // 4 :, : w // 4], "bottom-right": frame[-h // 4 :, -w // 4 :]}
    return max(corners, key=lambda c: corners[c].mean())


def test_a_rotated_phone_video_is_built_upright(tmp_path):
    _video(tmp_path / "phone.mp4", rotation=90)  # stored 32 wide x 16 high, shown 16 wide x 32 high
    with av.open(str(tmp_path / "phone.mp4")) as container:
        assert next(container.decode(video=0)).rotation == 90  # a real display matrix in the file
    stored = av.open(str(tmp_path / "phone.mp4"))
    raw = next(stored.decode(video=0)).to_ndarray(format="rgb24")
    stored.close()
    assert raw.shape == (16, 32, 3) and _corner(raw) == "top-left"  # what PyAV alone gives
    shown = decode_mp4((tmp_path / "phone.mp4").read_bytes())
    assert shown.shape == (8, 32, 16, 3) and _corner(shown[0]) == "bottom-left"  # turned 90 degrees counter-clockwise

    (tmp_path / "index.jsonl").write_text(json.dumps({"video": "phone.mp4", "caption": "portrait"}) + "\n")
    build_shards(tmp_path / "index.jsonl", tmp_path / "out", BuildSettings(frames=4, fps=FPS, size=(32, 16)), progress=False)
    (clip,) = [decode_mp4(s["mp4"]) for s in _samples(tmp_path / "out").values()][:1]
    assert clip.shape == (4, 32, 16, 3) and _corner(clip[0]) == "bottom-left"


def test_resume_is_keyed_by_row_content_not_position(tmp_path):
    for name in ("a", "b", "c"):
        write_mp4(tmp_path / f"{name}.mp4", np.full((8, 16, 16, 3), ord(name), np.uint8), fps=FPS)
    rows = [{"video": "a.mp4", "caption": "a"}, {"video": "b.mp4", "caption": "b"}]
    index = tmp_path / "index.jsonl"
    index.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = BuildSettings(frames=4, fps=FPS, size=(16, 16))
    build_shards(index, tmp_path / "out", settings, progress=False)
    before = {k: s["mp4"] for k, s in _samples(tmp_path / "out").items()}
    index.write_text("".join(json.dumps(r) + "\n" for r in [{"video": "c.mp4", "caption": "c"}, *rows]))  # a new first row
    summary = build_shards(index, tmp_path / "out", settings, progress=False)
    assert summary["rows_already_done"] == 2 and summary["clips_written"] == 2 and summary["samples"] == 6
    after = _samples(tmp_path / "out")
    assert {k: after[k]["mp4"] for k in before} == before  # a and b kept, under the same keys
    new = sorted(set(after) - set(before))
    assert len(new) == 2 and all(k.startswith("c-") for k in new)  # the inserted video was cut, nothing twice
    lines = [json.loads(line) for line in (tmp_path / "out" / "index.jsonl").read_text().splitlines()]
    assert len(lines) == len({line["key"] for line in lines}) == 6


def test_failed_videos_are_listed_by_cause_and_fail_the_build(tmp_path, capsys):
    _video(tmp_path / "good.mp4")
    whole = (tmp_path / "good.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "notes.mp4").write_text("these are my notes, not a video\n")
    _video(tmp_path / "short.mp4", frames=2)
    with av.open(str(tmp_path / "sound.mp4"), "w") as container:  # audio only
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for i in range(3):
            frame.pts = i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    names = ["good", "cut", "notes", "short", "sound", "gone"]
    (tmp_path / "index.jsonl").write_text("".join(json.dumps({"video": f"{n}.mp4"}) + "\n" for n in names))
    args = ["shards", "build", str(tmp_path / "index.jsonl"), "--out", str(tmp_path / "out"), "--frames", "4",
            "--size", "16", "--workers", "1", "--quiet"]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert "5 of the 6 videos could not be used" in out
    for line in ("truncated or damaged (1): cut.mp4", "not a video (1): notes.mp4", "too short (1): short.mp4",
                 "no video stream (1): sound.mp4", "missing (1): gone.mp4"):
        assert f"  {line}" in out.splitlines()
    assert err.startswith("error: shards build: 5 of 6 videos failed (") and "--allow-errors" in err
    assert len(err.strip().splitlines()) == 1
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert {e["video"]: e["cause"] for e in errors}["notes.mp4"] == "not a video"
    assert main([*args, "--allow-errors"]) == 0
