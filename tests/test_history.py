"""History in the built-in world and in training: "again" / "go back" episodes, multi-round windows,
the metric scored against the resolved action, and a 2-step multi-round fit."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pandora_lightning.data.dataset import BadSampleCounter, ExampleDecoder
from pandora_lightning.data.manifest import write_manifest
from pandora_lightning.data.video import encode_mp4
from pandora_lightning.errors import PandoraError
from pandora_lightning.training.checkpoint import load_stage
from pandora_lightning.training.fit import fit
from pandora_lightning.world import WorldConfig, sample_episode
from pandora_lightning.world.history import HISTORY_ACTIONS, OPPOSITE, check_history_action, history_kind, resolve
from pandora_lightning.world.metrics import ActionFollowing
from pandora_lightning.world.shards import episode_metadata, write_world_shards
from tests.conftest import tiny_recipe

HISTORY_WORLD = WorldConfig(rounds=4, history=0.6)


def test_history_actions_resolve_against_the_previous_round():
    assert resolve("again", "move_left") == "move_left" and resolve("undo", "grow") == "shrink"
    assert all(OPPOSITE[OPPOSITE[a]] == a for a in OPPOSITE)
    assert history_kind("  Do it AGAIN ") == "again" and history_kind("go back") == "undo" and history_kind("go left") is None
    with pytest.raises(PandoraError, match="no(ne| previous)"):
        resolve("again", None)


def test_history_episodes_store_the_resolved_action():
    rng = np.random.default_rng(0)
    kinds = []
    for _ in range(20):
        ep = sample_episode(HISTORY_WORLD, "meadow", rng)
        assert "refers" not in ep.actions[0]  # the first round has nothing to refer to
        for prev, span in zip(ep.actions, ep.actions[1:]):
            if "refers" in span:
                kinds.append(span["refers"])
                assert span["text"] in HISTORY_ACTIONS[span["refers"]]
                assert span["action"] == resolve(span["refers"], prev["action"])
                assert history_kind(span["resolved_text"]) is None
    assert {"again", "undo"} <= set(kinds)
    plain = sample_episode(WorldConfig(), "meadow", np.random.default_rng(0))
    assert all("refers" not in a for a in plain.actions)


def _history_sample(seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    while True:  # an episode whose second round refers to the first
        ep = sample_episode(HISTORY_WORLD, "space", rng)
        if ep.actions[1].get("refers"):
            break
    meta = episode_metadata(ep, HISTORY_WORLD, "train")
    return {"__key__": "k", "mp4": encode_mp4(ep.frames, 8), "json": json.dumps(meta).encode(), "meta": meta, "frames": ep.frames}


def test_multi_round_windows_give_one_text_per_round():
    sample = _history_sample()
    decoder = ExampleDecoder("action", frames=6, cond_frames=2, counter=BadSampleCounter(), rounds=3)
    example = decoder(sample, random.Random(0))
    spans = sample["meta"]["actions"]
    assert example["frames"].shape[0] == 2 + 3 * 4
    # a window never opens on a round that refers to one before it: here only round 1 can open it
    assert example["text"] == [s["text"] for s in spans[:3]] and example["text"][1] in HISTORY_ACTIONS[spans[1]["refers"]]
    assert example["teacher_text"] == [spans[0]["text"], spans[1]["resolved_text"], spans[2].get("resolved_text", spans[2]["text"])]
    single = ExampleDecoder("action", frames=6, cond_frames=2, counter=BadSampleCounter())(sample, random.Random(0))
    assert isinstance(single["text"], str) and single["frames"].shape[0] == 6
    with pytest.raises(ValueError, match="action texts"):
        ExampleDecoder("caption", 6, 2, BadSampleCounter(), rounds=2)


def test_windows_open_on_a_reference_only_when_asked():
    sample = _history_sample()  # its round 2 refers to round 1
    references = {s["text"]: s["resolved_text"] for s in sample["meta"]["actions"] if s.get("refers")}

    def openings(open_on_reference: bool) -> list[tuple[str, str]]:
        decoder = ExampleDecoder("action", 6, 2, BadSampleCounter(), rounds=2, open_on_reference=open_on_reference)
        examples = [decoder(sample, random.Random(seed)) for seed in range(40)]
        return [(e["text"][0], e["teacher_text"][0]) for e in examples]

    assert not any(text in references for text, _ in openings(False))
    opened = [(text, teacher) for text, teacher in openings(True) if text in references]
    # a window that opens on 'again' / 'go back' is taught what it resolves to: only its frames can tell
    assert opened and all(teacher == references[text] for text, teacher in opened)


def test_action_following_scores_history_rounds_against_the_resolved_action():
    sample = _history_sample()
    video = torch.from_numpy(sample["frames"]).permute(0, 3, 1, 2)[None]
    metric = ActionFollowing(2, 4)
    metric.update(video, [sample["meta"]])
    out = metric.compute()
    assert out["action_following"] == 1.0 and out["action_following/history"] == 1.0
    assert metric.report()["action_following_lenient"]["history"] == 1.0
    wrong = dict(sample["meta"], actions=[dict(a) for a in sample["meta"]["actions"]])
    for span in wrong["actions"]:  # as if every reference had been resolved the other way
        if span.get("refers"):
            span["action"] = OPPOSITE[span["action"]]
    metric = ActionFollowing(2, 4)
    metric.update(video, [wrong])
    assert metric.compute()["action_following/history"] == 0.0
    lenient = metric.report()["action_following_lenient"]
    assert lenient["history"] == 0.0 and lenient["plain"] == 1.0  # the rounds said plainly still count


def test_history_rounds_are_split_by_how_far_back_the_action_said_plainly_is():
    sample = _history_sample()
    video = torch.from_numpy(sample["frames"]).permute(0, 3, 1, 2)[None]
    meta = dict(sample["meta"], actions=[dict(a) for a in sample["meta"]["actions"]])
    for span, refers in zip(meta["actions"], (None, "again", "undo", None)):  # the labels only: the video is the same
        span.pop("refers", None)
        if refers:
            span["refers"] = refers
    meta["actions"][2]["action"] = OPPOSITE[meta["actions"][2]["action"]]  # round 3, 2 rounds back, resolved wrongly
    metric = ActionFollowing(2, 4)
    metric.update(video, [meta])
    lenient = metric.report()["action_following_lenient"]
    assert {k: v for k, v in lenient.items() if k.startswith("back_")} == {
        "back_1": 1.0, "back_1_count": 1.0, "back_2": 0.0, "back_2_count": 1.0}
    assert lenient["history"] == 0.5 and lenient["plain"] == 1.0


def test_history_actions_need_a_model_with_history():
    class Model:
        history_rounds = 1

    with pytest.raises(PandoraError, match="trained without history"):
        check_history_action("again", Model())
    check_history_action("move left", Model())
    Model.history_rounds = 4
    check_history_action("again", Model())


@pytest.fixture(scope="module")
def history_manifest(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("history-world")
    records = write_world_shards(out / "shards", HISTORY_WORLD, {"train": 4, "val": 1}, samples_per_shard=4)
    return Path(write_manifest(out / "world.yaml", "world", out / "shards", records).path)


@pytest.mark.parametrize("answer", [False, True], ids=["history", "history+answer"])
def test_multi_round_fit_with_history_trains_and_rolls_out(history_manifest, tmp_path, answer):
    extra = ["model.llm.previous_answer=true", "model.generator.cond_draft=0.5",
             "trainable=[input_adapter.*,llm.query_tokens,llm.model.model.*,output_adapter.*,answer_adapter.*,generator.unet.*,text_encoder.*]"]
    recipe = tiny_recipe("align", history_manifest, tmp_path / "align", "data.rounds=3", "model.llm.history_rounds=0",
                         "vocabulary=null", *(extra if answer else []))
    checkpoint = fit(recipe)
    stage = load_stage(checkpoint)
    model = stage.model
    assert model.history_rounds == 0 and model.reads_answer == answer
    if answer:  # the answer adapter trained with the rest, and export writes it beside the other adapters
        assert "answer_adapter.weight" in stage.trainable_names
        from safetensors.torch import load_file

        from pandora_lightning.training.export import export_checkpoint

        out = export_checkpoint(checkpoint, tmp_path / "export")
        written = load_file(out / "pandora" / "answer_adapter.safetensors")
        assert torch.equal(written["weight"], model.answer_adapter.weight.float())
        assert "answer_adapter" in json.loads((out / "export.json").read_text())["parts"]
    losses = (tmp_path / "align" / "logs" / "metrics.csv").read_text()
    assert "train/distill" in losses
    from pandora_lightning.inference.session import Session

    s = Session(model, torch.zeros(3, 32, 32), check_action=check_history_action)
    s.step("move left")
    s.step("again")
    assert s.frames.shape[0] == 2 + 2 * 4 and len(s.history) == 2
    assert all((r.answer is not None) == answer for r in s.records)


def test_fit_warns_when_the_window_reads_farther_back_than_training(caplog):
    from pandora_lightning.recipe import load_recipe
    from pandora_lightning.training.fit import warn_window_beyond_training

    root = Path(__file__).resolve().parents[1]
    history = root / "recipes/tiny-history/instruct.yaml"
    assert not warn_window_beyond_training(load_recipe(history))  # the window it trains
    assert not warn_window_beyond_training(load_recipe(root / "recipes/tiny/instruct.yaml"))  # no history
    with caplog.at_level("WARNING"):
        assert warn_window_beyond_training(load_recipe(history, ["model.llm.history_rounds=5"]))
    assert "data.rounds=4 trains windows of 4" in caplog.text and "set model.llm.history_rounds=4" in caplog.text
    assert warn_window_beyond_training(load_recipe(history, ["model.llm.history_rounds=0"]))  # every round
