"""Exact resume: fit N steps, stop, resume from the checkpoint for M more == fit N + M straight."""
import csv

import lightning as L
import pytest
import torch

from pandora_lightning import train
from pandora_lightning.stages.base import load_checkpoint_file
from tests.conftest import tiny_recipe


class KeyRecorder(L.Callback):
    def __init__(self):
        self.keys: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys.append(list(batch["key"]))


@pytest.fixture
def recorded(monkeypatch):
    """Every fit in the test gets a KeyRecorder; returns the recorders in order."""
    recorders = []
    build = train.build_trainer

    def build_with_recorder(*args, **kwargs):
        trainer = build(*args, **kwargs)
        recorders.append(KeyRecorder())
        trainer.callbacks.append(recorders[-1])
        return trainer

    monkeypatch.setattr(train, "build_trainer", build_with_recorder)
    return recorders


@pytest.fixture
def one_thread():
    # Both runs must use the same thread count to agree bit for bit; one thread is also the
    # fastest on a small shared CPU, where idle intra-op threads spin.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resumed_run_matches_an_uninterrupted_one(world_manifest, tmp_path, recorded, one_thread):
    # 3 batches an epoch: the resumed part crosses an epoch boundary.
    common = ["data.epoch_samples=6", "trainer.checkpoint_every_n_steps=2", "init_from=null"]
    straight = train.fit(tiny_recipe("instruct", world_manifest, tmp_path / "straight", "trainer.max_steps=4", *common))
    stopped = load_checkpoint_file(
        train.fit(tiny_recipe("instruct", world_manifest, tmp_path / "stopped", "trainer.max_steps=2", *common))
    )["state_dict"]
    resumed = train.fit(tiny_recipe("instruct", world_manifest, tmp_path / "stopped", "trainer.max_steps=4",
                                    "trainer.resume_from=last", *common))

    keys_straight, keys_first, keys_resumed = (r.keys for r in recorded)
    assert len(keys_straight) == 4 and keys_first + keys_resumed == keys_straight

    a, b = load_checkpoint_file(straight)["state_dict"], load_checkpoint_file(resumed)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "same ops in the same order on CPU: bit for bit"
    assert not all(torch.equal(a[k], stopped[k]) for k in a), "the resumed run trained"

    rows = list(csv.DictReader((tmp_path / "straight" / "logs" / "metrics.csv").open()))
    last = rows[-1]
    assert float(last["data/seen_samples"]) == 8 and float(last["data/bad_samples"]) == 0
    assert 0 <= float(last["data/wait_frac"]) < 1
