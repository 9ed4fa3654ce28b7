"""Trust boundaries of the data path: commands only on opt-in, keys never reach a path unsanitised,
damage anywhere in a tar is found and named by key."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from pandora_lightning.cli import main
from pandora_lightning.data.tar import read_shard, safe_key, sample_hash
from pandora_lightning.data.tools.verify import verify_shards
from pandora_lightning.data.video import encode_mp4
from pandora_lightning.evaluation.loop import RolloutBatch, write_media


def _samples(n: int, prefix: str = "k") -> list[dict]:
    rng = np.random.default_rng(0)
    meta = {"caption": "c", "actions": [{"text": "move left", "start": 2, "end": 6}], "domain": "d", "num_frames": 6}
    return [{"__key__": f"{prefix}{i}", "json": json.dumps(meta).encode(),
             "mp4": encode_mp4(rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), 8)} for i in range(n)]


def _write(path, samples):
    with wds.TarWriter(str(path), mtime=0) as writer:
        for s in samples:
            writer.write(s)
    return path


def _folder(tmp_path, n=10):
    samples = _samples(n)
    _write(tmp_path / "a.tar", samples)
    (tmp_path / "index.jsonl").write_text("".join(
        json.dumps({"key": s["__key__"], "shard": "a.tar", "hash": sample_hash(s)}) + "\n" for s in samples))
    return tmp_path / "a.tar"


def test_a_damaged_header_mid_shard_loses_nothing_silently(tmp_path, capsys):
    shard = _folder(tmp_path)
    offsets = {m.name: m.offset for m in tarfile.open(shard)}
    data = bytearray(shard.read_bytes())
    start, end = offsets["k2.json"], offsets["k3.json"]
    data[start:end] = b"\xff" * (end - start)  # both headers of sample k2 (and its data) destroyed
    shard.write_bytes(bytes(data))
    # Python's tarfile ends the shard at the damage: 8 of 10 samples vanish without an error
    assert len(list(tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r|"))) == 4
    # the project's reader reads on after it and reports the region once
    items = list(read_shard(str(shard)))
    assert [s["__key__"] for s in items if "__error__" not in s] == [f"k{i}" for i in (0, 1, *range(3, 10))]
    assert [s["__key__"] for s in items if "__error__" in s] == [f"bytes {start}-{end}"]

    report = verify_shards([str(tmp_path)], progress=False)
    assert [(key, why.split(" (")[0]) for _, key, why in report["lost"]] == [("k2", "listed in index.jsonl but not in the shard")]
    assert main(["shards", "verify", str(tmp_path), "--quiet"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"lost: {shard}:k2: listed in index.jsonl" in lines[0]
    assert lines[-1] == "10 expected by index.jsonl, 9 samples read from 1 shards: 1 lost, 1 damaged"


def test_verify_finds_a_flipped_byte_that_still_decodes_and_a_short_set(tmp_path, capsys):
    shard = _folder(tmp_path, n=3)
    member = next(m for m in tarfile.open(shard) if m.name == "k1.mp4")
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size - 5] ^= 0x01  # inside the clip's last bytes
    shard.write_bytes(bytes(data))
    (tmp_path / "m.yaml").write_text("sets:\n- {split: train, domain: d, shards: [a.tar], samples: 4}\n")
    report = verify_shards([str(tmp_path / "m.yaml")], progress=False)
    assert [(key, why) for _, key, why in report["corrupt"]] == [
        ("k1", "its bytes differ from what index.jsonl recorded (content hash mismatch)")]
    assert report["sets"] == [("train/d", 4, 3)]
    assert main(["shards", "verify", str(tmp_path / "m.yaml"), "--quiet"]) == 1
    assert "short: set train/d: the manifest says 4 samples, its shards hold 3" in capsys.readouterr().out


def test_pipe_sources_are_refused_without_opt_in(tmp_path, capsys):
    shard = _folder(tmp_path, n=2)
    marker = tmp_path / "ran"
    source = f"pipe:touch {marker}; cat {shard}"
    assert main(["shards", "verify", source, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: shard source names 'pipe:touch") and "--allow-commands" in err and "\n" not in err
    assert not marker.exists()
    assert main(["shards", "verify", source, "--quiet", "--allow-commands"]) == 0 and marker.exists()


def test_keys_are_sanitised_before_a_path_is_built(tmp_path):
    evil = "../../escaped"
    shard = _write(tmp_path / "evil.tar", [{**_samples(1)[0], "__key__": evil}])
    (key,) = [s["__key__"] for s in read_shard(str(shard))]
    assert key == evil  # the reader keeps the key as it is (messages print it escaped) ...
    out = tmp_path / "a" / "b" / "media"
    batch = RolloutBatch(index=0, first=0, keys=[key], truth=[np.zeros((2, 8, 8, 3), np.uint8)],
                         episodes=[{"fps": 8}], videos=torch.zeros(1, 2, 3, 8, 8), rounds=1)
    write_media(batch, out, "../../split")
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".tar")
    assert written == [f"a/b/media/{safe_key(evil)}.mp4", f"a/b/media/{safe_key('../../split')}-sheet-000.png"]
    assert safe_key(evil) != safe_key("escaped") and safe_key("ok-key_1") == "ok-key_1"  # ... and paths get a safe form


def test_caption_only_clips_are_named_before_training(tmp_path):
    from tests.conftest import tiny_recipe
    from tests.test_data import write_sets

    from pandora_lightning.errors import PandoraError
    from pandora_lightning.training.fit import fit

    no_actions = lambda s: {**s, "json": json.dumps({"caption": "a disc on a meadow", "actions": []}).encode()}  # noqa: E731
    manifest = write_sets(tmp_path / "d", {"meadow": (1, 3)}, corrupt={f"meadow-0-{i}": no_actions for i in range(3)})
    with pytest.raises(PandoraError) as info:
        fit(tiny_recipe("align", manifest, tmp_path / "run"))  # the tiny align recipe trains on action texts
    message = str(info.value)
    assert message.startswith("none of the first 3 clips of set 'train/meadow'") and "\n" not in message
    assert "has an action text" in message and "data.text_kind=action" in message and "data.text_kind=caption" in message
    assert not (tmp_path / "run").exists()  # stopped before the model was built or the run folder written


def test_corrupt_data_past_the_limit_writes_a_checkpoint_and_stops_with_one_line(tmp_path):
    from tests.conftest import tiny_recipe
    from tests.test_data import CORRUPTIONS, write_sets

    from pandora_lightning.errors import PandoraError
    from pandora_lightning.training.fit import fit

    corrupt = {f"meadow-0-{i}": CORRUPTIONS["not-mp4"] for i in range(4)}
    manifest = write_sets(tmp_path / "d", {"meadow": (2, 4)}, corrupt=corrupt)
    recipe = tiny_recipe("align", manifest, tmp_path / "run", "trainer.max_steps=50", "data.max_bad_fraction=0.1",
                         "data.min_bad_samples=2")
    with pytest.raises(PandoraError) as info:
        fit(recipe)
    message = str(info.value)
    assert message.startswith("stopped at step ") and "\n" not in message
    assert "corrupt samples among" in message and "data.max_bad_fraction=0.1" in message and "not-a-video" not in message
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "run" / "checkpoints" / "final.safetensors").exists()
    step = int(message.split()[3].rstrip(":"))
    assert step < 50
