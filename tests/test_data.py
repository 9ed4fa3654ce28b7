"""The training data path: decoding windows, corrupt samples, manifests, mixing, splitting, resume."""
import json
import logging
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from pandora_lightning.data.config import DataConfig
from pandora_lightning.errors import PandoraError
from pandora_lightning.data import loader as loader_module
from pandora_lightning.data.dataset import BadSampleCounter, ExampleDecoder, check_recolor, recolor
from pandora_lightning.data.loader import training_loader
from pandora_lightning.data.manifest import load_manifest
from pandora_lightning.data.stream import block_counts
from pandora_lightning.data.video import encode_mp4
from pandora_lightning.world import WorldConfig, sample_episode

_EPISODES: dict[str, tuple] = {}


def _episode(domain: str):
    if domain not in _EPISODES:
        world_domain = domain if domain in WorldConfig().domains else "meadow"
        episode = sample_episode(WorldConfig(), world_domain, np.random.default_rng(len(_EPISODES)))
        _EPISODES[domain] = (episode, encode_mp4(episode.frames, 8))
    return _EPISODES[domain]


def _sample(domain: str, key: str) -> dict:
    episode, mp4 = _episode(domain)
    meta = {"caption": episode.caption, "actions": episode.actions, "domain": domain}
    return {"__key__": key, "mp4": mp4, "json": json.dumps(meta).encode()}


def write_sets(root: Path, sets: dict, weights: dict | None = None, corrupt: dict | None = None) -> Path:
    """Shards of world clips, {domain: (shards, samples per shard)}, and their manifest; keys are
    `domain-shard-index`. `corrupt` maps keys to a function that breaks that sample."""
    root.mkdir(parents=True, exist_ok=True)
    total = sum(n * per for n, per in sets.values())
    lines = [f"name: test\nroot: {root}\nsets:"]
    for domain, (shards, per_shard) in sets.items():
        for s in range(shards):
            with wds.TarWriter(str(root / f"{domain}-{s:03d}.tar")) as writer:
                for i in range(per_shard):
                    key = f"{domain}-{s}-{i}"
                    sample = _sample(domain, key)
                    writer.write((corrupt or {}).get(key, lambda x: x)(sample))
        weight = (weights or {}).get(domain, shards * per_shard / total)
        lines.append(f"- {{split: train, domain: {domain}, shards: ['{domain}-{{000..{shards - 1:03d}}}.tar'], "
                     f"weight: {weight}, samples: {shards * per_shard}}}")
    (root / "manifest.yaml").write_text("\n".join(lines) + "\n")
    return root / "manifest.yaml"


def make_loader(manifest: Path, workers: int = 0, batch: int = 2, epoch_samples: int = 0, seed: int = 0, **data):
    cfg = DataConfig(batch_size=batch, num_workers=workers, shuffle_buffer=8, epoch_samples=epoch_samples, **data)
    return training_loader(load_manifest(manifest, allow_commands=cfg.allow_commands), cfg, "action", 6, 2, (32, 32), seed)


def take(loader, batches: int) -> list[str]:
    """Keys of the next `batches` batches, across epochs as a training loop would go."""
    keys: list[str] = []
    while len(keys) < batches * loader.batch_size:
        for batch in loader:
            keys += batch["key"]
            if len(keys) >= batches * loader.batch_size:
                break
    return keys


# --- one sample -> one example ---------------------------------------------------------------


def test_action_window_ends_given_frames_where_the_action_starts():
    episode, _ = _episode("meadow")
    sample = _sample("meadow", "k0")
    decoder = ExampleDecoder("action", frames=6, cond_frames=2, counter=BadSampleCounter())
    for _ in range(10):
        example = decoder(sample)
        assert example["frames"].shape == (6, 3, 32, 32) and example["key"] == "k0"
        got = example["frames"].numpy().astype(int)
        # The text may occur twice in an episode; one of its spans must be the window.
        windows = [episode.frames[a["start"] - 2 : a["start"] + 4].transpose(0, 3, 1, 2) for a in episode.actions if a["text"] == example["text"]]
        assert min(np.abs(got - w).max() for w in windows) <= 2  # lossless codec, YUV rounding


def test_caption_window_starts_at_frame_zero():
    episode, _ = _episode("meadow")
    example = ExampleDecoder("caption", frames=6, cond_frames=2, counter=BadSampleCounter())(_sample("meadow", "k"))
    assert example["text"] == episode.caption
    assert np.abs(example["frames"].numpy().astype(int) - episode.frames[:6].transpose(0, 3, 1, 2)).max() <= 2


def test_action_under_way_from_the_first_frame_gives_a_window_from_frame_zero():
    """Built clips often carry one action over the whole clip (a robot instruction)."""
    episode, _ = _episode("meadow")
    sample = {**_sample("meadow", "k"), "json": json.dumps({"caption": "c", "actions": [{"text": "pick", "start": 0, "end": 14}]}).encode()}
    example = ExampleDecoder("action", 6, 2, BadSampleCounter())(sample)
    assert example["text"] == "pick"
    assert np.abs(example["frames"].numpy().astype(int) - episode.frames[:6].transpose(0, 3, 1, 2)).max() <= 2


def test_decoder_scales_clips_to_the_model_size():
    example = ExampleDecoder("caption", 6, 2, BadSampleCounter(), size=(16, 24))(_sample("meadow", "k"))
    assert example["frames"].shape == (6, 3, 16, 24)


def _too_few_frames(s):
    episode, _ = _episode("meadow")
    return {**s, "mp4": encode_mp4(episode.frames[:4], 8)}


CORRUPTIONS = {
    "truncated-mp4": lambda s: {**s, "mp4": s["mp4"][: len(s["mp4"]) // 3]},
    "not-mp4": lambda s: {**s, "mp4": b"not a video"},
    "no-mp4": lambda s: {k: v for k, v in s.items() if k != "mp4"},
    "bad-json": lambda s: {**s, "json": b"{broken"},
    "no-json": lambda s: {k: v for k, v in s.items() if k != "json"},
    "too-few-frames": _too_few_frames,
    "action-past-the-clip": lambda s: {**s, "json": json.dumps({"caption": "x", "num_frames": 14, "actions": [
        {"text": "move left", "start": 2, "end": 99}]}).encode()},
    "huge-number": lambda s: {**s, "json": json.dumps({"caption": "x", "actions": [
        {"text": "move left", "start": 10**30, "end": 10**31}]}).encode()},
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_sample_is_skipped_and_counted(corrupt, caplog):
    counter = BadSampleCounter(log_each=True)
    decoder = ExampleDecoder("action", frames=6, cond_frames=2, counter=counter)
    assert decoder(corrupt({**_sample("meadow", "bad-one"), "__url__": "mem"})) is None
    assert decoder(_sample("meadow", "good")) is not None
    assert (counter.bad, counter.seen, counter.no_text) == (1, 2, 0)
    assert counter.reports[0][:2] == ("mem", "bad-one")
    assert "mem:bad-one" in caplog.text


def test_a_clip_without_the_stages_text_is_not_corrupt():
    counter = BadSampleCounter()
    decoder = ExampleDecoder("action", frames=6, cond_frames=2, counter=counter)
    caption_only = json.dumps({"caption": "a meadow", "actions": [], "domain": "meadow"}).encode()
    assert decoder({**_sample("meadow", "k"), "json": caption_only}) is None
    assert (counter.bad, counter.no_text) == (0, 1) and "no action text" in counter.no_text_example
    assert ExampleDecoder("caption", 6, 2, counter)({**_sample("meadow", "k"), "json": caption_only}) is not None


def test_the_limit_is_a_fraction_with_a_minimum_count():
    from pandora_lightning.data.dataset import bad_limit_reached

    assert not bad_limit_reached(1, 10, 0.05, 4)  # 10% but fewer than min_bad_samples
    assert bad_limit_reached(1, 10, 0.05, 1)  # a small set: min_bad_samples=1 lets the fraction decide
    assert not bad_limit_reached(4, 100, 0.05, 4) and bad_limit_reached(6, 100, 0.05, 4)


# --- manifests ---------------------------------------------------------------------------------


def test_manifest_errors(tmp_path, world_manifest):
    manifest = load_manifest(world_manifest)
    with pytest.raises(PandoraError, match="no shard sets for split 'test'"):
        manifest.sets_for("test")
    (tmp_path / "a.tar").write_bytes(b"")
    cases = {
        "sets: []": "lists no shard sets",
        "sets:\n- {split: train, domain: a, shards: ['x-{000..002}.tar'], samples: 3}": "names missing shard .*x-000.tar",
        "sets:\n- {split: train, domain: a, shards: ['*.zip'], samples: 3}": "has no shards",
        "sets:\n- {split: train, domain: a, shard: ['a.tar'], samples: 3}": "unknown key 'shard' .did you mean shards",
        "sets:\n- {split: train, domain: a, shards: ['a.tar'], weight: 0, samples: 3}": "weight must be > 0",
        "sets:\n- {split: train, domain: a, shards: ['a.tar']}": "samples must be > 0",
        "sets:\n- {split: train, domain: a, shards: ['a.tar'], weight: 0.5, samples: 1}\n"
        "- {split: train, domain: b, shards: ['a.tar'], weight: 0.4, samples: 1}": "weights of split 'train' sum to 0.9, not 1",
        "sets:\n- {split: train, domain: a, shards: ['a.tar'], samples: 1}\n"
        "- {split: train, domain: a, shards: ['a.tar'], samples: 1}": "'train/a' appears twice",
        "nmae: x\nsets: []": "unknown key 'nmae' .did you mean name",
    }
    for i, (body, message) in enumerate(cases.items()):
        (tmp_path / f"m{i}.yaml").write_text(body + "\n")
        with pytest.raises(PandoraError, match=message):
            load_manifest(tmp_path / f"m{i}.yaml")
    (tmp_path / "ok.yaml").write_text("sets:\n- {split: train, domain: a, shards: ['a.tar', 'pipe:cat a.tar', 'https://h/b-{0..1}.tar'], samples: 3}\n")
    with pytest.raises(PandoraError, match="set 'train/a' names 'pipe:cat a.tar', which runs a command"):
        load_manifest(tmp_path / "ok.yaml")
    ok = load_manifest(tmp_path / "ok.yaml", allow_commands=True)
    assert ok.urls(ok.sets[0]) == [str(tmp_path / "a.tar"), "pipe:cat a.tar", "https://h/b-0.tar", "https://h/b-1.tar"]


# --- mixing, splitting, epochs -------------------------------------------------------------------


def test_block_counts_follow_the_weights():
    assert block_counts([0.6, 0.3, 0.1], 10) == [6, 3, 1]
    assert block_counts([1, 1, 1], 4) == [2, 1, 1] and sum(block_counts([0.7, 0.2, 0.1], 7)) == 7


def test_mixing_follows_the_weights_not_the_set_sizes(tmp_path):
    weights = {"meadow": 0.6, "space": 0.3, "ocean": 0.1}
    manifest = write_sets(tmp_path, {"meadow": (1, 4), "space": (2, 4), "ocean": (3, 4)}, weights)
    loader = make_loader(manifest, batch=8, epoch_samples=240)
    domains = Counter(key.split("-")[0] for key in take(loader, 30))
    for domain, weight in weights.items():
        assert abs(domains[domain] / 240 - weight) < 0.02, domains


def test_data_domains_trains_on_those_domains_only_with_their_weights_renormalised(tmp_path):
    weights = {"meadow": 0.5, "space": 0.3, "ocean": 0.2}
    manifest = write_sets(tmp_path, {"meadow": (1, 4), "space": (2, 4), "ocean": (3, 4)}, weights)
    loader = make_loader(manifest, batch=8, domains=["space", "ocean"])
    assert len(loader) == 20 // 8  # an epoch is the chosen sets' 8 + 12 samples
    domains = Counter(key.split("-")[0] for key in take(loader, 2))
    assert set(domains) == {"space", "ocean"} and abs(domains["space"] / 16 - 0.6) <= 0.13, domains
    with pytest.raises(PandoraError, match="data.domains: desert not in split 'train'.*it has: meadow, space, ocean"):
        make_loader(manifest, domains=["ocean", "desert"])


def test_an_epoch_reads_every_sample_once_across_workers(tmp_path):
    manifest = write_sets(tmp_path, {"meadow": (4, 3), "space": (2, 2)})  # 12 + 4 samples, weights 0.75 / 0.25
    loader = make_loader(manifest, workers=2, batch=2)
    assert len(loader) == 8
    keys = take(loader, 8)
    assert len(keys) == 16 and len(set(keys)) == 16
    second = take(loader, 8)
    assert sorted(second) == sorted(keys) and second != keys  # the next epoch reshuffles


@pytest.mark.parametrize("shards", [4, 1], ids=["split-by-shards", "split-by-samples"])
def test_ranks_and_workers_read_disjoint_parts(tmp_path, monkeypatch, shards):
    manifest = write_sets(tmp_path, {"meadow": (shards, 16 // shards), "space": (shards, 16 // shards)})
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(loader_module, "dist_info", lambda rank=rank: (rank, 2))
        loader = make_loader(manifest, workers=2, batch=2)
        assert len(loader) == 8  # 32 samples / (2 ranks x 2)
        seen.append(take(loader, 8))
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 32


def test_seed_changes_the_order(tmp_path):
    manifest = write_sets(tmp_path, {"meadow": (2, 4)})
    a, b = take(make_loader(manifest, seed=0), 4), take(make_loader(manifest, seed=1), 4)
    assert sorted(a) == sorted(b) and a != b
    assert take(make_loader(manifest, seed=0), 4) == a


def test_epoch_shorter_than_a_batch_is_refused(tmp_path):
    manifest = write_sets(tmp_path, {"meadow": (1, 2)})
    with pytest.raises(PandoraError, match="less than one batch"):
        len(make_loader(manifest, batch=4))


# --- resume ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_a_restored_loader_continues_the_same_order(tmp_path, workers):
    manifest = write_sets(tmp_path, {"meadow": (3, 3), "space": (1, 5)}, {"meadow": 0.5, "space": 0.5})
    straight = take(make_loader(manifest, workers, epoch_samples=10), 13)  # 5 batches an epoch
    for stop in (3, 5, 7):  # mid-epoch with an odd worker to go on with, at the epoch end, in epoch 2
        first = make_loader(manifest, workers, epoch_samples=10)
        keys = take(first, stop)
        resumed = make_loader(manifest, workers, epoch_samples=10)
        resumed.load_state_dict(first.state_dict())
        assert keys + take(resumed, 13 - stop) == straight, stop


def test_a_checkpoint_from_another_geometry_starts_the_next_epoch(tmp_path, caplog):
    manifest = write_sets(tmp_path, {"meadow": (2, 4)})
    first = make_loader(manifest, epoch_samples=8)
    take(first, 1)
    state = {**first.state_dict(), "num_workers": 3}
    resumed = make_loader(manifest, epoch_samples=8)
    resumed.load_state_dict(state)
    assert resumed.position == 4 and "cannot continue exactly" in caplog.text


# --- corrupt samples in the stream ------------------------------------------------------------------


def test_truncated_tar_is_counted_once_by_key_however_often_it_is_read(tmp_path, caplog):
    manifest = write_sets(tmp_path, {"meadow": (2, 4)})
    cut = tmp_path / "meadow-000.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # ends inside a member
    loader = make_loader(manifest, max_bad_fraction=1.0)
    keys = take(loader, 8)  # several passes over the small set
    assert len(keys) == 16 and set(keys) >= {f"meadow-1-{i}" for i in range(4)}
    assert loader.bad == 1 and loader.seen > 8  # read in every pass, counted once
    (where, reason), = loader.bad_samples.items()
    assert where.startswith(f"{cut}:meadow-0-") and "truncated" in reason
    assert len([r for r in caplog.records if "skipping corrupt sample" in r.getMessage()]) == 1


def test_workers_report_corrupt_samples_to_the_training_process(tmp_path, caplog):
    corrupt = {"meadow-0-1": CORRUPTIONS["not-mp4"], "meadow-1-2": CORRUPTIONS["bad-json"], "space-0-0": _too_few_frames}
    manifest = write_sets(tmp_path, {"meadow": (2, 4), "space": (2, 4)}, corrupt=corrupt)
    loader = make_loader(manifest, workers=2, max_bad_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="pandora_lightning"):
        keys = take(loader, len(loader))
    # Each worker draws past its corrupt samples (and may meet them again in its next pass).
    assert len(keys) == 16 and not set(corrupt) & set(keys)
    assert loader.bad == 3 and loader.seen >= 16 + 3
    assert len([r for r in caplog.records if "skipping corrupt sample" in r.getMessage()]) == 3
    for key in corrupt:
        shard = tmp_path / f"{key.split('-')[0]}-{int(key.split('-')[1]):03d}.tar"
        assert f"{shard}:{key}" in caplog.text


def test_too_many_corrupt_samples_stop_the_loader(tmp_path):
    corrupt = {f"meadow-{s}-{i}": CORRUPTIONS["not-mp4"] for s in range(2) for i in range(8)}
    manifest = write_sets(tmp_path, {"meadow": (2, 8), "space": (1, 8)}, corrupt=corrupt)
    loader = make_loader(manifest, workers=0, max_bad_fraction=0.1)
    take(loader, 2)
    assert loader.bad >= 4 and "data.max_bad_fraction=0.1" in loader.stop_reason()


def test_shards_open_through_webdataset_urls_only_on_opt_in(tmp_path):
    """`pipe:` (and http, s3, ... through webdataset's gopen) run commands: refused unless data.allow_commands."""
    write_sets(tmp_path, {"meadow": (2, 2)})
    marker = tmp_path / "ran"
    (tmp_path / "pipe.yaml").write_text(
        f"sets:\n- {{split: train, domain: meadow, shards: ['pipe:touch {marker}; cat {tmp_path}/meadow-{{000..001}}.tar'],"
        f" samples: 4}}\n"
    )
    with pytest.raises(PandoraError, match="runs a command.*data.allow_commands=true"):
        make_loader(tmp_path / "pipe.yaml")
    assert not marker.exists()
    keys = take(make_loader(tmp_path / "pipe.yaml", allow_commands=True), 2)
    assert sorted(keys) == sorted(f"meadow-{s}-{i}" for s in range(2) for i in range(2)) and marker.exists()


# --- recoloured clips (data.recolor) ------------------------------------------------------------


def test_recolor_changes_colours_not_shapes_or_motion():
    """Each recolouring maps every pixel value one to one, the same in every frame: pixels equal
    before are equal after and different ones stay different; all 48 recolourings occur."""
    frames = torch.from_numpy(_episode("meadow")[0].frames.transpose(0, 3, 1, 2).copy())
    flat = frames.permute(0, 2, 3, 1).reshape(-1, 3)
    _, groups = torch.unique(flat, dim=0, return_inverse=True)
    rng, seen = random.Random(0), set()
    for _ in range(600):
        out = recolor(frames, rng)
        assert out.dtype == torch.uint8 and out.shape == frames.shape
        out_flat = out.permute(0, 2, 3, 1).reshape(-1, 3)
        _, out_groups = torch.unique(out_flat, dim=0, return_inverse=True)
        pairs = set(zip(groups.tolist(), out_groups.tolist()))
        assert len(pairs) == len(set(groups.tolist())) == len(set(out_groups.tolist()))
        seen.add(tuple(out_flat[0].tolist()))
    assert len(seen) == 48


def test_recolored_stream_is_a_share_of_clips_and_reproducible(tmp_path):
    manifest = write_sets(tmp_path, {"meadow": (2, 8)})

    def frames(recolor):
        return [b["frames"] for b in make_loader(manifest, epoch_samples=16, recolor=recolor)]

    plain, once, again = frames(0.0), frames(0.5), frames(0.5)
    assert all(torch.equal(a, b) for a, b in zip(once, again))  # the same draws: resume stays exact
    changed = [not torch.equal(p[i], o[i]) for p, o in zip(plain, once) for i in range(len(p))]
    assert 3 <= sum(changed) <= 13  # about half of 16 (1 in 48 recolourings is the identity)


def test_recolor_keeps_away_from_the_colours_to_avoid():
    frames = torch.from_numpy(_episode("meadow")[0].frames.transpose(0, 3, 1, 2).copy())
    inverted = (255 - frames[0].flatten(1).double().mean(dim=1)).tolist()  # the meadow's mean colour, inverted
    rng, medians = random.Random(1), []
    for _ in range(300):
        out = recolor(frames, rng, avoid=(tuple(inverted),), radius=60.0)
        medians.append(out[0].flatten(1).double().mean(dim=1))
    distances = torch.stack(medians).sub(torch.tensor(inverted, dtype=torch.float64)).norm(dim=1)
    assert distances.min() > 60.0
    assert len({tuple(m.tolist()) for m in medians}) >= 40  # the others are all still drawn
    with pytest.raises(ValueError, match="data.recolor_avoid"):
        DataConfig(recolor=0.5, recolor_avoid=[[300, 0, 0]])


def test_recolor_is_refused_with_captions_and_out_of_range():
    with pytest.raises(ValueError, match="data.recolor=0.5 recolours clips whose caption texts name their colours"):
        check_recolor(0.5, "caption")
    for bad in ({"recolor": 1.5}, {"recolor": 0.5, "precomputed": True}):
        with pytest.raises(ValueError, match="data.recolor"):
            DataConfig(**bad)
    check_recolor(0.0, "caption")
