"""Exact resume: fit N steps, stop, resume from the checkpoint for M more == fit N + M straight."""
import csv
import json

import lightning as L
import pytest
import torch

from pandora_lightning.training import fit as train
from pandora_lightning.training.checkpoint import load_checkpoint_file
from tests.conftest import tiny_recipe
from tests.test_ddp import KeysToFile


class KeyRecorder(L.Callback):
    def __init__(self):
        self.keys: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys.append(list(batch["key"]))


def attach_to_every_fit(monkeypatch, callback_cls) -> list:
    """Every fit in the test gets a fresh callback_cls(); returns them in order."""
    recorders = []
    build = train.build_trainer

    def build_with_recorder(*args, **kwargs):
        trainer = build(*args, **kwargs)
        recorders.append(callback_cls())
        trainer.callbacks.append(recorders[-1])
        return trainer

    monkeypatch.setattr(train, "build_trainer", build_with_recorder)
    return recorders


@pytest.fixture
def recorded(monkeypatch):
    """Every fit in the test gets a KeyRecorder; returns the recorders in order."""
    return attach_to_every_fit(monkeypatch, KeyRecorder)


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
    # The resumed run's log is the whole history (Lightning's CSV logger would have deleted steps 0-1):
    # the same steps with the same losses as the uninterrupted run.
    resumed_rows = list(csv.DictReader((tmp_path / "stopped" / "logs" / "metrics.csv").open()))
    history = lambda rows: [(r["step"], r["train/loss"]) for r in rows if r.get("train/loss")]  # noqa: E731
    assert len(history(rows)) == 4 and history(resumed_rows) == history(rows)
    last = rows[-1]
    assert float(last["data/seen_samples"]) == 8 and float(last["data/bad_samples"]) == 0
    assert 0 <= float(last["data/wait_frac"]) < 1


class WeightRecorder(L.Callback):
    """The trainable weights a run starts with and has after each optimizer step."""

    def __init__(self):
        self.weights: list[dict[str, torch.Tensor]] = []

    def record(self, pl_module):
        self.weights.append({n.removeprefix("model."): p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})

    def on_fit_start(self, trainer, pl_module):
        self.record(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.record(pl_module)


def test_the_model_file_holds_the_weight_average_and_a_resumed_run_keeps_it(world_manifest, tmp_path, monkeypatch, one_thread):
    """trainer.ema_decay: the final model file holds decay-weighted averages of the weights the run went
    through (from its start), and a run stopped and resumed writes the same file bit for bit."""
    from safetensors.torch import load_file

    recorders = attach_to_every_fit(monkeypatch, WeightRecorder)
    common = ["data.epoch_samples=6", "trainer.checkpoint_every_n_steps=2", "init_from=null", "trainer.ema_decay=0.5"]
    straight = load_file(train.fit(tiny_recipe("instruct", world_manifest, tmp_path / "straight", "trainer.max_steps=4", *common)))
    average = dict(recorders[0].weights[0])
    for weights in recorders[0].weights[1:]:  # 4 steps
        average = {n: 0.5 * average[n] + 0.5 * weights[n] for n in average}
    assert len(recorders[0].weights) == 5
    for name, value in average.items():
        torch.testing.assert_close(straight[name], value, rtol=0, atol=1e-6)
    assert all(not torch.equal(straight[n], recorders[0].weights[-1][n]) for n in average)  # not the last weights
    train.fit(tiny_recipe("instruct", world_manifest, tmp_path / "stopped", "trainer.max_steps=2", *common))
    resumed = load_file(train.fit(tiny_recipe("instruct", world_manifest, tmp_path / "stopped", "trainer.max_steps=4",
                                              "trainer.resume_from=last", *common)))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_resume_under_ddp_matches_an_uninterrupted_run(world_manifest, tmp_path, monkeypatch, one_thread):
    """The same as above with 2 ranks (CPU DDP over gloo): each rank resumes its own data position."""
    runs = []  # per fit, the folder where each rank writes the keys it trained on (the ranks are forked)
    build = train.build_trainer

    def build_with_recorder(*args, **kwargs):
        trainer = build(*args, **kwargs)
        runs.append(tmp_path / f"keys-{len(runs)}")
        runs[-1].mkdir()
        trainer.callbacks.append(KeysToFile(runs[-1]))
        return trainer

    monkeypatch.setattr(train, "build_trainer", build_with_recorder)
    # 3 batches of 2 an epoch on each of 2 ranks: stopped mid-epoch, the resumed part crosses an epoch boundary.
    common = ["data.epoch_samples=12", "trainer.checkpoint_every_n_steps=2", "init_from=null", "trainer.accelerator=cpu",
              "trainer.devices=2", "trainer.strategy=ddp_fork_find_unused_parameters_true", "trainer.logger=none"]
    train.fit(tiny_recipe("instruct", world_manifest, tmp_path / "straight", "trainer.max_steps=4", *common))
    train.fit(tiny_recipe("instruct", world_manifest, tmp_path / "stopped", "trainer.max_steps=2", *common))
    # The ranks' checkpoint: with the fork launcher the process that called fit never trained, and the model
    # file it writes holds no loop or data state (see pandora_lightning/data/loader.py).
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    stopped = load_checkpoint_file(last)
    assert stopped["global_step"] == 2
    train.fit(tiny_recipe("instruct", world_manifest, tmp_path / "stopped", "trainer.max_steps=4",
                          f"trainer.resume_from={last}", *common))

    def keys(run: int, rank: int) -> list[list[str]]:
        return [json.loads(line) for line in (runs[run] / f"keys-{rank}.jsonl").read_text().splitlines()]

    for rank in (0, 1):
        assert len(keys(0, rank)) == 4 and len(keys(1, rank)) == 2
        assert keys(1, rank) + keys(2, rank) == keys(0, rank), f"rank {rank} resumed with other data"
    assert not {k for b in keys(0, 0) for k in b} & {k for b in keys(0, 1) for k in b}, "the ranks read the same data"

    a, b = (load_checkpoint_file(tmp_path / run / "checkpoints" / "last.ckpt") for run in ("straight", "stopped"))
    assert a["global_step"] == b["global_step"] == 4
    a, b = a["state_dict"], b["state_dict"]
    assert a.keys() == b.keys()
    # 2 ranks: every gradient element is all-reduced as the same sum of 2 numbers in both runs, so bit for bit.
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert not all(torch.equal(a[k], stopped["state_dict"][k]) for k in a), "the resumed run trained"


def test_a_weight_average_under_fsdp2_is_refused_in_one_line(world_manifest, tmp_path):
    from pandora_lightning.errors import PandoraError

    recipe = tiny_recipe("instruct", world_manifest, tmp_path / "run", "parallel.strategy=fsdp2", "trainer.devices=2",
                         "trainer.ema_decay=0.9")
    with pytest.raises(PandoraError, match="trainer.ema_decay keeps a whole copy .* set trainer.ema_decay=0"):
        train.fit(recipe)
    assert not (tmp_path / "run").exists()
