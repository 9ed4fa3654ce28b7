"""`shards build / inspect / verify` on a folder of generated clips."""
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pandora_lightning.cli import main
from pandora_lightning.data.config import DataConfig
from pandora_lightning.errors import PandoraError
from pandora_lightning.data.tools.build import BuildSettings, build_shards, read_index
from pandora_lightning.data.tools.checks import inspect_shards
from pandora_lightning.data.tools.verify import verify_shards
from pandora_lightning.data.loader import training_loader
from pandora_lightning.data.manifest import load_manifest
from pandora_lightning.data.video import decode_mp4, encode_mp4, write_mp4
from pandora_lightning.world import WorldConfig, sample_episode

FPS = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """6 source videos at 64x64 (players' yuv420p), 14 frames at 8 fps, with an index naming them."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    episodes, rows = [], []
    for i in range(6):
        domain = ("meadow", "space")[i % 2]
        ep = sample_episode(WorldConfig(), domain, rng)
        write_mp4(root / f"clip{i}.mp4", ep.frames, fps=FPS, scale=2)
        episodes.append(ep)
        rows.append({"video": f"clip{i}.mp4", "caption": ep.caption, "domain": domain,
                     "actions": [{"text": a["text"], "start": a["start"] / FPS, "end": a["end"] / FPS} for a in ep.actions]})
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, episodes, rows


def _samples(out):
    return {s["__key__"]: s for s in wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False)}


def test_build_cuts_resizes_and_indexes_the_clips(folder, tmp_path):
    root, episodes, _ = folder
    settings = BuildSettings(frames=6, fps=FPS, size=(32, 32), stride=4, shard_bytes=30_000)
    summary = build_shards(root / "index.jsonl", tmp_path / "out", settings, workers=2, progress=False)
    # 14 frames, clips of 6 every 4 frames: starts 0, 4, 8 -> 3 clips a video
    assert summary["clips_written"] == summary["samples"] == 18 and summary["errors"] == 0
    samples = _samples(tmp_path / "out")
    assert len(samples) == 18
    (sample,) = [s for k, s in samples.items() if k.startswith("clip2-") and k.endswith("-000004")]
    meta = json.loads(sample["json"])
    frames = decode_mp4(sample["mp4"])
    assert frames.shape == (6, 32, 32, 3)
    # downscaled back to the world's own 32 px: close to the original frames 4..9
    assert np.abs(frames.astype(int) - episodes[2].frames[4:10]).mean() < 6
    # actions at 2-6, 6-10, 10-14 in the video -> clip frames 0-2, 2-6 (6-10 clipped), ...
    assert [(a["start"], a["end"]) for a in meta["actions"]] == [(0, 2), (2, 6)]
    assert [a["text"] for a in meta["actions"]] == [a["text"] for a in episodes[2].actions[:2]]
    assert (meta["domain"], meta["split"], meta["source"], meta["clip_start"], meta["num_frames"]) == ("meadow", "train", "clip2.mp4", 0.5, 6)

    index = [json.loads(line) for line in (tmp_path / "out" / "index.jsonl").read_text().splitlines()]
    assert {line["key"] for line in index} == set(samples)
    assert all(line["key"] in {s["__key__"] for s in wds.WebDataset(str(tmp_path / "out" / line["shard"]), shardshuffle=False)}
               for line in index[:4])

    manifest = load_manifest(summary["manifest"])  # validated: weights sum to 1, every shard exists
    assert {(s.domain, s.samples, s.weight) for s in manifest.sets} == {("meadow", 9, 0.5), ("space", 9, 0.5)}
    loader = training_loader(manifest, DataConfig(batch_size=3, num_workers=0), "action", 6, 2, (32, 32), seed=0)
    assert next(iter(loader))["frames"].shape == (3, 6, 3, 32, 32)


def test_build_resumes_without_rewriting_finished_shards(folder, tmp_path):
    root, _, _ = folder
    settings = BuildSettings(frames=14, fps=FPS, size=(32, 32), shard_bytes=1)  # one video a shard
    out = tmp_path / "out"
    build_shards(root / "index.jsonl", out, settings, progress=False)
    shards = sorted(out.glob("*.tar"))
    assert len(shards) == 6
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    samples = _samples(out)
    # Interrupted while writing the last shard of each domain: its file is still .tmp.
    for last in ("train-meadow-000002.tar", "train-space-000002.tar"):
        (out / last).rename(out / f"{last}.tmp")
    summary = build_shards(root / "index.jsonl", out, settings, progress=False)
    assert summary["rows_already_done"] == 4 and summary["clips_written"] == 2 and summary["samples"] == 6
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}
    assert after.keys() == before.keys() and not list(out.glob("*.tmp"))
    rewritten = {name for name in before if after[name][0] != before[name][0]}
    assert rewritten == {"train-meadow-000002.tar", "train-space-000002.tar"}
    assert all(after[name][1] == before[name][1] for name in before), "a resumed build writes the same bytes"
    assert _samples(out) == samples
    lines = (out / "index.jsonl").read_text().splitlines()
    assert len(lines) == 6 and len({json.loads(line)["key"] for line in lines}) == 6
    with pytest.raises(PandoraError, match="other settings .*frames"):
        build_shards(root / "index.jsonl", out, BuildSettings(frames=6, fps=FPS, size=(32, 32)), progress=False)


def test_build_from_csv_with_segments_frame_actions_and_a_broken_video(folder, tmp_path):
    root, _, _ = folder
    (root / "broken.mp4").write_bytes(b"not a video")
    (tmp_path / "index.csv").write_text(
        "video,caption,domain,split,start,end,actions,action,action_start,action_end\n"
        f"{root / 'clip0.mp4'},a disc,robot arm,val,0.5,1.5,,pick it up,0.5,1.25\n"
        f"{root / 'clip1.mp4'},a square,game,train,,,\"[{{\"\"text\"\": \"\"jump\"\", \"\"start_frame\"\": 4, \"\"end_frame\"\": 12}}]\",,,\n"
        f"{root / 'broken.mp4'},x,game,train,,,,,,\n"
    )
    summary = build_shards(tmp_path / "index.csv", tmp_path / "out", BuildSettings(frames=8, fps=FPS, size=(16, 24)), progress=False)
    assert summary["errors"] == 1 and "broken.mp4" in (tmp_path / "out" / "errors.jsonl").read_text()
    samples = {json.loads(s["json"])["domain"]: s for s in _samples(tmp_path / "out").values()}
    robot, game = json.loads(samples["robot_arm"]["json"]), json.loads(samples["game"]["json"])
    assert robot["split"] == "val" and robot["clip_start"] == 0.5 and robot["actions"] == [{"text": "pick it up", "start": 0, "end": 6}]
    assert game["actions"] == [{"text": "jump", "start": 4, "end": 8}]  # source frames 4-12 at 8 fps, clip 0-8
    assert decode_mp4(samples["game"]["mp4"]).shape == (8, 16, 24, 3)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"caption": "x"}', "line 1: no 'video'"),
        ('{"video": "a.mp4", "captoin": "x"}', "unknown column 'captoin' .did you mean caption"),
        ('{"video": "a.mp4", "actions": [{"text": "go", "start": 2, "end": 1}]}', "ends .1.0. before it starts"),
        ('{"video": "a.mp4", "start": "soon"}', "start must be a number"),
        ("not json", "line 1: not JSON"),
    ],
)
def test_bad_index_rows_are_named(tmp_path, line, message):
    (tmp_path / "index.jsonl").write_text(line + "\n")
    with pytest.raises(PandoraError, match=message):
        read_index(tmp_path / "index.jsonl")


def _corrupt_shard(path, good_sample):
    episode = sample_episode(WorldConfig(), "meadow", np.random.default_rng(1))
    with wds.TarWriter(str(path)) as writer:
        writer.write({**good_sample, "__key__": "fine"})
        writer.write({**good_sample, "__key__": "broken-mp4", "mp4": good_sample["mp4"][:300]})
        writer.write({**good_sample, "__key__": "bad-json", "json": b"{nope"})
        writer.write({**good_sample, "__key__": "few-frames", "mp4": encode_mp4(episode.frames[:3], 8),
                      "json": json.dumps({"caption": "c", "actions": [], "num_frames": 3}).encode()})


def test_verify_reports_each_kind_of_corrupt_sample(folder, tmp_path, capsys):
    root, _, _ = folder
    out = tmp_path / "out"
    build_shards(root / "index.jsonl", out, BuildSettings(frames=14, fps=FPS, size=(32, 32), shard_bytes=1), progress=False)
    good = next(iter(wds.WebDataset(str(out / "train-meadow-000000.tar"), shardshuffle=False)))
    _corrupt_shard(out / "train-meadow-000009.tar", good)
    truncated = out / "train-space-000000.tar"
    truncated.write_bytes(truncated.read_bytes()[:2000])

    report = verify_shards([str(out)], min_frames=14, progress=False)
    reasons = {key: why for _, key, why in report["corrupt"]}
    (cut,) = [key for key in reasons if key.startswith("clip1-")]
    reasons["clip1"] = reasons.pop(cut)
    # shard 9 is not in index.jsonl: its samples are unexpected (and three of them broken); the truncated
    # shard's one sample lost its mp4 member, named by key
    assert set(reasons) == {"fine", "broken-mp4", "bad-json", "few-frames", "clip1"}
    assert reasons["fine"] == "not in index.jsonl (an unexpected sample)"
    assert "no mp4 member" in reasons["clip1"] and "truncated" in reasons["clip1"]
    assert "decode" in reasons["broken-mp4"] and "JSON" in reasons["bad-json"] and "fewer than 14" in reasons["few-frames"]
    assert report["lost"] == [] and report["damaged"] == []

    assert main(["shards", "verify", str(out), "--quiet", "--workers", "2"]) == 1
    printed = capsys.readouterr().out
    assert f"corrupt: {out / 'train-meadow-000009.tar'}:bad-json" in printed and "5 corrupt" in printed.splitlines()[-1]


def test_inspect_counts_and_draws_a_contact_sheet(folder, tmp_path, capsys):
    root, _, _ = folder
    out = tmp_path / "out"
    code = main(["shards", "build", str(root / "index.jsonl"), "--out", str(out), "--frames", "7", "--size", "32",
                 "--shard-size", "20KB", "--workers", "1", "--quiet"])
    assert code == 0 and "12 clips from 6 videos" in capsys.readouterr().out
    report = inspect_shards([str(out / "manifest.yaml")], sheet=tmp_path / "sheet.png", sheet_samples=3, sheet_frames=4)
    assert report["samples"] == 12 and report["unreadable"] == []
    meadow = report["sets"]["train/meadow"]
    assert meadow["samples"] == 6 and meadow["clip_s"] == 7 / FPS and meadow["actions_per_clip"] == 2.0
    sheet = np.asarray(Image.open(tmp_path / "sheet.png"))
    assert sheet.shape == (2 + 3 * (128 + 2), 2 + 4 * (128 + 2), 3) and len(report["sheet_keys"]) == 3
    assert main(["shards", "inspect", str(out)]) == 0  # a bare folder: sets named by the samples' JSON
    printed = capsys.readouterr().out
    assert "train/meadow" in printed and "train/space" in printed and "12 samples" in printed
