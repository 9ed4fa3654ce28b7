import json

import numpy as np
import pytest
import webdataset as wds

from pandora_lightning.config import ConfigError
from pandora_lightning.data.dataset import BadSampleCounter, ExampleDecoder, TooManyBadSamples, training_stream
from pandora_lightning.data.manifest import load_manifest
from pandora_lightning.data.video import encode_mp4
from pandora_lightning.world import WorldConfig, sample_episode


def _episode_sample(key="k0"):
    episode = sample_episode(WorldConfig(), "meadow", np.random.default_rng(3))
    meta = {"caption": episode.caption, "actions": episode.actions, "domain": "meadow"}
    return episode, {"__key__": key, "__url__": "mem", "mp4": encode_mp4(episode.frames, 8), "json": json.dumps(meta).encode()}


def test_action_window_ends_given_frames_where_the_action_starts():
    episode, sample = _episode_sample()
    decoder = ExampleDecoder("action", frames=6, cond_frames=2, counter=BadSampleCounter())
    for _ in range(10):
        example = decoder(sample)
        assert example["frames"].shape == (6, 3, 32, 32)
        got = example["frames"].numpy().astype(int)
        # The text may occur twice in an episode; one of its spans must be the window.
        windows = [episode.frames[a["start"] - 2 : a["start"] + 4].transpose(0, 3, 1, 2) for a in episode.actions if a["text"] == example["text"]]
        assert min(np.abs(got - w).max() for w in windows) <= 2  # lossless codec, YUV rounding


def test_caption_window_starts_at_frame_zero():
    episode, sample = _episode_sample()
    example = ExampleDecoder("caption", frames=6, cond_frames=2, counter=BadSampleCounter())(sample)
    assert example["text"] == episode.caption
    assert np.abs(example["frames"].numpy().astype(int) - episode.frames[:6].transpose(0, 3, 1, 2)).max() <= 2


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda s: {**s, "mp4": s["mp4"][: len(s["mp4"]) // 3]},
        lambda s: {**s, "mp4": b"not a video"},
        lambda s: {**s, "json": b"{broken"},
        lambda s: {k: v for k, v in s.items() if k != "json"},
        lambda s: {**s, "json": json.dumps({"caption": "x", "actions": [], "domain": "meadow"}).encode()},
    ],
    ids=["truncated-mp4", "not-mp4", "bad-json", "no-json", "no-actions"],
)
def test_corrupt_sample_is_skipped_and_counted(corrupt, caplog):
    _, sample = _episode_sample("bad-one")
    counter = BadSampleCounter(max_fraction=1.0)
    decoder = ExampleDecoder("action", frames=6, cond_frames=2, counter=counter)
    assert decoder(corrupt(sample)) is None
    assert decoder(sample) is not None
    assert (counter.bad, counter.seen) == (1, 2)
    assert "mem:bad-one" in caplog.text


def test_too_many_bad_samples_stop_the_run():
    _, sample = _episode_sample()
    decoder = ExampleDecoder("action", frames=6, cond_frames=2, counter=BadSampleCounter(max_fraction=0.05))
    with pytest.raises(TooManyBadSamples, match="data.max_bad_fraction"):
        for _ in range(20):
            decoder({**sample, "mp4": b"junk"})


def test_truncated_tar_is_skipped_and_the_stream_goes_on(tmp_path):
    _, sample = _episode_sample()
    good, cut = tmp_path / "good.tar", tmp_path / "cut.tar"
    with wds.TarWriter(str(good)) as w:
        for i in range(4):
            w.write({**sample, "__key__": f"k{i}"})
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # ends inside a member
    (tmp_path / "m.yaml").write_text(f"root: {tmp_path}\nsets:\n- {{split: train, domain: meadow, shards: [cut.tar, good.tar]}}\n")
    counter = BadSampleCounter(max_fraction=1.0)
    decoder = ExampleDecoder("action", 6, 2, counter)
    stream = iter(training_stream(load_manifest(tmp_path / "m.yaml"), "train", decoder, shuffle_buffer=1, seed=0))
    examples = [next(stream) for _ in range(30)]
    assert all(e["frames"].shape == (6, 3, 32, 32) for e in examples)
    assert counter.bad >= 1


def test_stream_mixes_every_domain(world_manifest):
    decoder = ExampleDecoder("action", 6, 2, BadSampleCounter())
    stream = iter(training_stream(load_manifest(world_manifest), "train", decoder, shuffle_buffer=4, seed=0))
    domains = {next(stream)["domain"] for _ in range(80)}
    assert domains == {"meadow", "space", "ocean", "desert"}


def test_manifest_errors(tmp_path, world_manifest):
    manifest = load_manifest(world_manifest)
    with pytest.raises(ConfigError, match="no shard sets for split 'test'"):
        manifest.sets_for("test")
    (tmp_path / "empty.yaml").write_text("name: x\nsets: []\n")
    with pytest.raises(ConfigError, match="lists no shard sets"):
        load_manifest(tmp_path / "empty.yaml")
    (tmp_path / "missing.yaml").write_text("sets:\n- {split: train, domain: a, shards: ['x-{000..002}.tar']}\n")
    with pytest.raises(ConfigError, match="names missing shard .*x-000.tar"):
        load_manifest(tmp_path / "missing.yaml").urls(load_manifest(tmp_path / "missing.yaml").sets[0])
    (tmp_path / "glob.yaml").write_text("sets:\n- {split: train, domain: a, shards: ['*.tar']}\n")
    with pytest.raises(ConfigError, match="has no shards"):
        load_manifest(tmp_path / "glob.yaml").urls(load_manifest(tmp_path / "glob.yaml").sets[0])
    (tmp_path / "typo.yaml").write_text("sets:\n- {split: train, domain: a, shard: ['a.tar']}\n")
    with pytest.raises(ConfigError, match="did you mean shards"):
        load_manifest(tmp_path / "typo.yaml")
    (tmp_path / "weight.yaml").write_text("sets:\n- {split: train, domain: a, shards: ['a.tar'], weight: 0}\n")
    with pytest.raises(ConfigError, match="weight must be > 0"):
        load_manifest(tmp_path / "weight.yaml")
