"""A 2-process DDP fit on CPU (gloo): the ranks read disjoint data, and the checkpoint holds both ranks' positions."""
import json

import lightning as L
import torch

from pandora_lightning.training import fit as train
from tests.conftest import tiny_recipe
from tests.test_data import write_sets


class KeysToFile(L.Callback):
    """Each rank appends the keys of its batches to keys-<rank>.jsonl (ranks run in spawned processes)."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(self.folder / f"keys-{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(batch["key"]) + "\n")


def test_two_ranks_read_disjoint_data(tmp_path, monkeypatch):
    # 2 domains x 4 shards x 2 samples = 16 samples; one epoch = 4 steps of 2 samples on each of 2 ranks.
    manifest = write_sets(tmp_path / "shards", {"meadow": (4, 2), "space": (4, 2)})
    build = train.build_trainer

    def build_with_recorder(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.callbacks.append(KeysToFile(tmp_path))
        return trainer

    monkeypatch.setattr(train, "build_trainer", build_with_recorder)
    recipe = tiny_recipe(
        "align", manifest, tmp_path / "run", "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=4",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_fork_find_unused_parameters_true", "trainer.logger=none",
    )
    train.fit(recipe)

    ranks = [[k for line in (tmp_path / f"keys-{r}.jsonl").read_text().splitlines() for k in json.loads(line)] for r in (0, 1)]
    assert [len(keys) for keys in ranks] == [8, 8]
    assert not set(ranks[0]) & set(ranks[1]), "the ranks saw the same sample"
    assert len(set(ranks[0]) | set(ranks[1])) == 16, "one epoch covers every sample once across the job"
    for keys in ranks:  # each rank's share follows the weights (0.5 / 0.5)
        assert sum(k.startswith("meadow") for k in keys) == 4

    # The periodic checkpoint (written inside the ranks) holds the data position of both ranks.
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert state["world_size"] == 2 and state["position"] == 4 and len(state["ranks"]) == 2
    assert all(sum(r["draws"].values()) == 8 for r in state["ranks"])
    assert len(ckpt["callbacks"]["RandomState"]["ranks"]) == 2
