"""Tests for MP4 coding, image helpers and world shard writing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pandora_lightning.data.video import contact_sheet, decode_mp4, encode_mp4, save_png, write_mp4
from pandora_lightning.world.shards import write_world_shards
from pandora_lightning.world import (
    DOMAINS,
    TRANSFER_DOMAIN,
    TRANSFER_HELD_OUT,
    WorldConfig,
    render_states,
    sample_episode,
    split_actions,
)
from pandora_lightning.world.domains import ObjectState


def _clip(t=6, h=32, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


# --- mp4 ---------------------------------------------------------------------


def test_encode_decode_round_trip_is_near_lossless():
    ep = sample_episode(WorldConfig(), "space", np.random.default_rng(0))
    out = decode_mp4(encode_mp4(ep.frames, 8))
    assert out.shape == ep.frames.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - ep.frames).max() <= 3
    noisy = _clip()  # worst case for the codec: independent random pixels
    assert np.abs(decode_mp4(encode_mp4(noisy, 8)).astype(int) - noisy).max() <= 3


def test_decode_stops_after_num_frames():
    clip = _clip(t=10)
    data = encode_mp4(clip, 8)
    first = decode_mp4(data, num_frames=3)
    assert first.shape == (3, 32, 32, 3)
    assert np.abs(first.astype(int) - clip[:3]).max() <= 3
    assert decode_mp4(data, num_frames=50).shape[0] == 10


@pytest.mark.parametrize("data", [b"", b"not a video at all" * 20])
def test_decode_rejects_garbage(data):
    with pytest.raises(ValueError, match="MP4|mp4"):
        decode_mp4(data)


def test_decode_rejects_truncated_file():
    data = encode_mp4(_clip(), 8)
    with pytest.raises(ValueError, match="decode"):
        decode_mp4(data[:200])


def test_encode_validates_input():
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4(_clip().astype(np.float32), 8)
    with pytest.raises(ValueError, match="shape"):
        encode_mp4(_clip()[..., :2], 8)
    with pytest.raises(ValueError, match="fps"):
        encode_mp4(_clip(), 0)


def test_write_mp4_upscales_and_pads_odd_sizes(tmp_path):
    clip = np.zeros((4, 15, 13, 3), np.uint8)
    clip[:, :5, :5] = (250, 20, 20)
    path = tmp_path / "view.mp4"
    write_mp4(path, clip, fps=8, scale=3)
    out = decode_mp4(path.read_bytes())
    assert out.shape == (4, 46, 40, 3)  # 45x39 padded to even
    # Nearest-neighbour upscale: the red block covers 15x15 px; check its interior.
    assert out[:, 2:13, 2:13, 0].mean() > 200 and out[:, 25:, 25:, 0].mean() < 30


def test_contact_sheet_layout_and_save_png(tmp_path):
    a = np.zeros((3, 8, 8, 3), np.uint8)
    b = np.full((2, 8, 8, 3), 100, np.uint8)
    sheet = contact_sheet([a, b], scale=2, gap=1)
    assert sheet.shape == (1 + 2 * 17, 1 + 3 * 17, 3)
    assert (sheet[1:17, 1:17] == 0).all()  # first frame of row a
    assert (sheet[18:34, 18:34] == 100).all()  # second frame of row b
    assert (sheet[18:34, 35:51] == 255).all()  # missing third frame of b is blank
    assert (sheet[0] == 255).all() and (sheet[17] == 255).all()  # gaps
    path = tmp_path / "sheet.png"
    save_png(path, sheet)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), sheet)
    with pytest.raises(ValueError, match="H, W"):
        contact_sheet([a, np.zeros((2, 4, 4, 3), np.uint8)])
    with pytest.raises(ValueError, match="uint8"):
        save_png(path, sheet.astype(float))


# --- world shards --------------------------------------------------------------


def _read(out_dir, records, split, domain):
    rec = next(r for r in records if r["split"] == split and r["domain"] == domain)
    paths = [str(out_dir / s) for s in rec["shards"]]
    return rec, list(wds.WebDataset(paths, shardshuffle=False))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    cfg = WorldConfig()
    counts = {"train": 20, "val": 6, "transfer": 6}
    records = write_world_shards(out, cfg, counts, samples_per_shard=8, seed=5)
    return out, cfg, records


def test_shard_records_and_names(shards):
    out, cfg, records = shards
    pairs = [(r["split"], r["domain"]) for r in records]
    expected = [("train", d) for d in DOMAINS] + [("val", d) for d in DOMAINS]
    expected.append(("transfer", TRANSFER_DOMAIN))
    assert pairs == expected
    train_meadow = records[0]
    assert train_meadow["samples"] == 20
    assert train_meadow["shards"] == [f"train-meadow-{i:06d}.tar" for i in range(3)]
    on_disk = sorted(p.name for p in out.iterdir() if p.suffix == ".tar")
    assert on_disk == sorted(s for r in records for s in r["shards"])
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]  # keys and hashes for verify
    assert len(index) == sum(r["samples"] for r in records) and {"key", "shard", "hash"} <= set(index[0])


def test_shard_round_trip_matches_episode(shards):
    out, cfg, records = shards
    rec, samples = _read(out, records, "train", "ocean")
    assert len(samples) == rec["samples"] == 20
    assert len({s["__key__"] for s in samples}) == 20 and samples[3]["__key__"] == "train-ocean-000003"
    domain = DOMAINS["ocean"]
    for s in samples[:5]:
        meta = json.loads(s["json"])
        frames = decode_mp4(s["mp4"])
        states = [ObjectState(x, y, r, (int(c0), int(c1), int(c2))) for x, y, r, c0, c1, c2 in meta["states"]]
        rendered = render_states(domain, states, cfg.image_size)
        assert frames.shape == (cfg.num_frames, 32, 32, 3)
        # States are rounded to 1e-4 px in JSON; that can flip at most a few edge pixels.
        assert np.mean(np.abs(frames.astype(int) - rendered) > 3) < 0.01
        assert meta["source"] == "world" and meta["split"] == "train" and meta["domain"] == "ocean"
        assert (meta["fps"], meta["cond_frames"], meta["round_frames"], meta["image_size"]) == (8, 2, 4, 32)
        assert [(a["start"], a["end"]) for a in meta["actions"]] == [(2, 6), (6, 10), (10, 14)]
        assert "diamond" in meta["caption"] and len(meta["states"]) == cfg.num_frames


def test_shards_equal_a_direct_episode_from_the_same_stream(shards):
    out, cfg, records = shards
    _, samples = _read(out, records, "val", "space")
    rng = np.random.default_rng([5, 1, list(DOMAINS).index("space")])
    ep = sample_episode(cfg, "space", rng, split_actions("space", "val"), split="val")
    meta = json.loads(samples[0]["json"])
    assert np.abs(decode_mp4(samples[0]["mp4"]).astype(int) - ep.frames).max() <= 3
    assert meta["caption"] == ep.caption and meta["actions"] == ep.actions


def test_transfer_domain_hides_held_out_actions_outside_transfer_split(shards):
    out, cfg, records = shards
    for split in ("train", "val"):
        _, samples = _read(out, records, split, TRANSFER_DOMAIN)
        used = {a["action"] for s in samples for a in json.loads(s["json"])["actions"]}
        assert used and not used & set(TRANSFER_HELD_OUT)
    _, samples = _read(out, records, "transfer", TRANSFER_DOMAIN)
    used = {a["action"] for s in samples for a in json.loads(s["json"])["actions"]}
    assert used & set(TRANSFER_HELD_OUT) and used - set(TRANSFER_HELD_OUT)  # all of desert's actions, scored apart
    _, meadow = _read(out, records, "train", "meadow")
    meadow_used = {a["action"] for s in meadow for a in json.loads(s["json"])["actions"]}
    assert meadow_used & set(TRANSFER_HELD_OUT)


def test_splits_use_different_start_states(shards):
    out, cfg, records = shards
    starts = {}
    for split in ("train", "val"):
        _, samples = _read(out, records, split, "meadow")
        starts[split] = {tuple(json.loads(s["json"])["states"][0][:3]) for s in samples}
    assert not starts["train"] & starts["val"]


def test_write_world_shards_is_deterministic(tmp_path):
    cfg = WorldConfig(domains=("meadow",))
    a = write_world_shards(tmp_path / "a", cfg, {"val": 3}, seed=1)
    b = write_world_shards(tmp_path / "b", cfg, {"val": 3}, seed=1)
    c = write_world_shards(tmp_path / "c", cfg, {"val": 3}, seed=2)
    def read(out_dir, records):
        paths = [str(out_dir / f) for f in records[0]["shards"]]
        return [json.loads(s["json"]) for s in wds.WebDataset(paths, shardshuffle=False)]

    assert read(tmp_path / "a", a) == read(tmp_path / "b", b)
    assert read(tmp_path / "a", a) != read(tmp_path / "c", c)


def test_write_world_shards_validation(tmp_path):
    with pytest.raises(ValueError, match="unknown splits"):
        write_world_shards(tmp_path, WorldConfig(), {"test": 2})
    with pytest.raises(ValueError, match=">= 0"):
        write_world_shards(tmp_path, WorldConfig(), {"train": -1})
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_world_shards(tmp_path, WorldConfig(), {"train": 1}, samples_per_shard=0)
    with pytest.raises(ValueError, match="transfer domain"):
        write_world_shards(tmp_path, WorldConfig(domains=("meadow",)), {"transfer": 2})
