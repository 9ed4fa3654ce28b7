"""The tiny tokenizers' vocabulary comes from the recipe, is stored in the checkpoint and warns about unknown words."""
from __future__ import annotations

import json
import logging

import torch
import webdataset as wds

from pandora_lightning.data.dataset import split_texts
from pandora_lightning.data.manifest import load_manifest, write_manifest
from pandora_lightning.inference.rollout import rollout
from pandora_lightning.training.checkpoint import load_checkpoint_file, load_stage
from pandora_lightning.training.fit import fit
from pandora_lightning.training.vocabulary import read_vocabulary_file, unknown_words
from pandora_lightning.world.vocabulary import world_vocabulary
from tests.conftest import tiny_recipe

KITCHEN = {  # the world's canonical actions, said in a user's kitchen words
    "move_left": "pick up the red cup and place it on the left shelf",
    "move_right": "slide the mug right along the counter",
    "move_up": "lift the kettle up",
    "move_down": "lower the kettle down",
    "grow": "pour more water so the puddle grows",
    "shrink": "wipe the puddle smaller",
}


def kitchen_manifest(world_manifest, tmp_path):
    """The test world's train split with every text replaced by kitchen words."""
    manifest = load_manifest(world_manifest)
    records = []
    for shard_set in manifest.sets_for("train"):
        name = f"kitchen-{shard_set.domain}.tar"
        with wds.TarWriter(str(tmp_path / name)) as writer:
            for sample in wds.WebDataset(manifest.urls(shard_set), shardshuffle=False, empty_check=False):
                meta = json.loads(sample["json"])
                for action in meta["actions"]:
                    action["text"] = KITCHEN[action["action"]]
                meta["caption"] = "a kitchen where " + ", then ".join(a["text"] for a in meta["actions"])
                writer.write({"__key__": sample["__key__"], "mp4": sample["mp4"], "json": json.dumps(meta).encode()})
        records.append({"split": "train", "domain": shard_set.domain, "shards": [name], "samples": shard_set.samples})
    return write_manifest(tmp_path / "kitchen.yaml", "kitchen", tmp_path, records).path


def test_user_texts_train_with_their_own_stored_vocabulary(world_manifest, tmp_path, caplog):
    manifest = kitchen_manifest(world_manifest, tmp_path)
    texts = split_texts(load_manifest(manifest), "train")
    # With the world's words, most of the kitchen's are unknown: that is what the warning is for.
    assert sum(unknown_words(world_vocabulary(), texts).values()) > len(texts)
    with caplog.at_level(logging.WARNING, logger="pandora_lightning"):
        fit(tiny_recipe("align", manifest, tmp_path / "world-words"))
    warned = [r.message for r in caplog.records if "not in the tokenizer's vocabulary" in r.message]
    assert len(warned) == 1 and "'kettle'" in warned[0] and "become <unk>" in warned[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pandora_lightning"):
        checkpoint = fit(tiny_recipe("align", manifest, tmp_path / "own-words", "vocabulary=null"))
    assert not [r for r in caplog.records if "vocabulary" in r.message]
    stored = load_checkpoint_file(checkpoint)["hyper_parameters"]["vocabulary"]
    assert {"cup", "shelf", "kettle", "puddle"} <= set(stored) and not unknown_words(stored, texts)
    tokenizer = load_stage(checkpoint).model.llm.tokenizer
    assert tokenizer.unk_token_id not in tokenizer(KITCHEN["move_left"]).input_ids


def test_a_checkpoint_keeps_its_vocabulary_when_the_words_change(world_manifest, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("\n".join(world_vocabulary()) + "\n")
    checkpoint = fit(tiny_recipe("align", world_manifest, tmp_path / "run", f"vocabulary={words}"))
    start = torch.zeros(1, 3, 32, 32)
    model = load_stage(checkpoint).model
    ids = model.llm.tokenizer("move left").input_ids
    before = rollout(model, start, [["move left"], ["grow"]], seed=3)

    # The phrasings change: new words sort in front of the old ones and shift every token id.
    words.write_text("\n".join(["aardvark", "abacus", *world_vocabulary()]) + "\n")
    assert read_vocabulary_file(words)[:2] == ["aardvark", "abacus"]
    again = load_stage(checkpoint).model
    assert again.llm.tokenizer("move left").input_ids == ids
    assert torch.equal(rollout(again, start, [["move left"], ["grow"]], seed=3), before)
