"""The world's action-following metric as `score` reports it: strict beside lenient, a bootstrap
interval over episodes, the text-ignoring chance level, the held-out-action rounds, DDP sync."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from pandora_lightning.evaluation.metrics.interval import bootstrap_interval
from pandora_lightning.evaluation.report import markdown
from pandora_lightning.recipe import load_recipe
from pandora_lightning.world import DOMAINS, SPLITS, TRANSFER_DOMAIN, ObjectState, WorldConfig, render_states, sample_episode, simulate
from pandora_lightning.world.domains import PRACTICE_DOMAINS
from pandora_lightning.world.metrics import ActionFollowing
from pandora_lightning.world.shards import episode_metadata

WORLD = WorldConfig(held_out_rounds=4)


def rollouts(split: str, per_domain: int, rate: float = 1.0, seed: int = 0):
    """Videos carrying out each round at `rate` x the commanded change, and the episodes' shard JSON."""
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    names = [TRANSFER_DOMAIN] if split == "transfer" else list(DOMAINS)
    videos, metas = [], []
    for name in names:
        for _ in range(per_domain):
            ep = sample_episode(WORLD, name, rng, split=split)
            d, states = DOMAINS[name], list(ep.states[: WORLD.cond_frames])
            for span in ep.actions:
                s0 = states[-1]
                for t in simulate(d, s0, span["action"], WORLD.round_frames):
                    states.append(ObjectState(s0.x + rate * (t.x - s0.x), s0.y + rate * (t.y - s0.y),
                                              s0.radius + rate * (t.radius - s0.radius), s0.color))
            videos.append(render_states(d, states, WORLD.image_size))
            metas.append(episode_metadata(ep, WORLD, split))
    return torch.from_numpy(np.stack(videos)).permute(0, 1, 4, 2, 3), metas


def test_bootstrap_interval_resamples_episodes():
    values = np.array([1, 1, 0, 1, 0, 0, 1, 1], float)
    episodes = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    lo, hi = bootstrap_interval(values, episodes)
    assert lo < values.mean() < hi and (lo, hi) == bootstrap_interval(values, episodes)
    assert bootstrap_interval(np.ones(6), np.arange(6)) == (1.0, 1.0)
    assert bootstrap_interval(np.array([]), np.array([])) is None
    many = bootstrap_interval(np.tile(values, 25), np.repeat(np.arange(100), 2))
    assert many[1] - many[0] < hi - lo  # more episodes, narrower
    with pytest.raises(ValueError, match="same shape"):
        bootstrap_interval(values, episodes[:3])


def test_exact_rollouts_score_one_with_interval_and_chance():
    metric = ActionFollowing(WORLD.cond_frames, WORLD.round_frames, list(DOMAINS))
    metric.update(*rollouts("val", 4))
    report = metric.report()
    strict, lenient = report["action_following"], report["action_following_lenient"]
    assert strict["overall"] == lenient["overall"] == 1.0 and strict["count"] == 4 * 4 * 4
    assert strict["interval"] == (1.0, 1.0) and strict["per_round"] == [1.0] * 4
    chance = strict["baseline"]
    assert 0.1 < chance["overall"] < 0.45 and set(chance["per_domain"]) == set(DOMAINS)
    assert "action_following_held_out" not in report  # val never asks for a held-out action


def test_wrong_rate_fails_strictly_but_not_leniently():
    metric = ActionFollowing(WORLD.cond_frames, WORLD.round_frames, list(DOMAINS))
    metric.update(*rollouts("val", 3, rate=0.4))
    report = metric.report()
    assert report["action_following"]["overall"] == 0.0
    assert report["action_following_lenient"]["overall"] > 0.9
    low, high = report["action_following"]["interval"]
    assert low == high == 0.0


def test_transfer_rounds_of_held_out_actions_are_reported_apart():
    metric = ActionFollowing(WORLD.cond_frames, WORLD.round_frames, [TRANSFER_DOMAIN])
    metric.update(*rollouts("transfer", 6))
    report = metric.report()
    held = report["action_following_held_out"]
    assert 0 < held["count"] < report["action_following"]["count"]
    assert held["overall"] == 1.0 and held["baseline"]["overall"] < 0.6
    assert all(v in (1.0, None) for v in held["per_round"])


def test_records_gather_across_processes():
    """Two 'ranks' score halves of the episodes; a fake all-gather gives the one-process report."""
    videos, metas = rollouts("val", 2, rate=0.9, seed=4)
    whole = ActionFollowing(WORLD.cond_frames, WORLD.round_frames, list(DOMAINS))
    whole.update(videos, metas)
    peer = ActionFollowing(WORLD.cond_frames, WORLD.round_frames, list(DOMAINS))
    peer.update(videos[4:], metas[4:])
    peer_records = itertools.cycle([torch.cat(peer.records)])
    rank0 = ActionFollowing(WORLD.cond_frames, WORLD.round_frames, list(DOMAINS),
                            dist_sync_fn=lambda t, group=None: [t, next(peer_records)], distributed_available_fn=lambda: True)
    rank0.update(videos[:4], metas[:4])
    assert rank0.report() == whole.report()


def test_markdown_prints_interval_and_chance_beside_the_accuracy():
    metric = ActionFollowing(WORLD.cond_frames, WORLD.round_frames, list(DOMAINS))
    metric.update(*rollouts("val", 2))
    scores = {"checkpoint": "c.ckpt", "stage": "instruct", "manifest": "m.yaml", "seed": 0, "per_domain": 2,
              "wall_seconds": 1.0, "skipped": {}, "splits": {"val": {"episodes": 8, "rounds": 32, "metrics": metric.report()}}}
    text = markdown(scores)
    chance = metric.report()["action_following"]["baseline"]["overall"]
    assert f"1.000 [1.00, 1.00] (chance {chance:.2f})" in text
    assert "action following (lenient)" in text and "text-ignoring" in text


def test_demo_summary_and_spread_over_seeds():
    from pandora_lightning.world.demo import seed_spread, split_summary

    runs = []
    for rate in (1.0, 0.4):
        metric = ActionFollowing(WORLD.cond_frames, WORLD.round_frames, list(DOMAINS))
        metric.update(*rollouts("val", 1, rate=rate))
        runs.append({"val": split_summary(metric.report())})
    strict = runs[0]["val"]["action_following"]
    assert strict["overall"] == 1.0 and strict["interval"] == (1.0, 1.0) and 0 < strict["chance"] < 0.6
    spread = seed_spread(runs)["val"]
    assert spread["action_following"]["values"] == [1.0, 0.0] and spread["action_following"]["mean"] == 0.5
    assert spread["action_following_lenient"]["min"] > 0.5


def test_demo_summary_prints_history_rounds_as_figures(capsys):
    from pandora_lightning.world.demo import print_summary

    history = {"history": 0.153, "again": 0.0555555555, "undo": None, "plain": 0.332}
    lenient = {"history": 0.9, "again": 0.8, "undo": 1.0, "plain": 0.95, "back_1": 0.95, "back_1_count": 20.0,
               "back_3": 0.5, "back_3_count": 2.0}
    print_summary({"splits": {"val": {"history": history, "history_lenient": lenient}}, "seed": 0, "steps": {},
                   "wall_seconds": {}, "rollouts": "x"})
    lines = [l.strip() for l in capsys.readouterr().out.splitlines() if "again" in l or "back" in l]
    assert lines == ["rounds said as 'again'/'go back', strict: 0.153 (again 0.056, undo n/a); other rounds 0.332",
                     "rounds said as 'again'/'go back', lenient: 0.900 (again 0.800, undo 1.000); other rounds 0.950",
                     "by rounds back to the action said plainly: 1: 0.95 (20), 3: 0.50 (2)"]


def test_demo_long_trains_the_recipes_longer(monkeypatch, tmp_path, capsys):
    """`demo --long` multiplies each tiny recipe's own steps (align 2x, instruct 4x) and nothing else."""
    import pandora_lightning.world.demo as demo
    from pandora_lightning.cli import main

    class Trained(Exception):
        pass

    trained = {}

    def fake_fit(recipe, callbacks=(), overwrite=False):
        trained[recipe.stage] = recipe.trainer.max_steps
        if recipe.stage == "instruct":
            raise Trained  # stop before the rollouts
        return tmp_path / "align.safetensors"

    monkeypatch.setattr(demo, "build_world", lambda *a, **k: None)
    monkeypatch.setattr(demo, "fit", fake_fit)
    with pytest.raises(Trained):
        demo.run_demo(tmp_path / "run", long=True)
    own = {s: load_recipe(f"recipes/tiny/{s}.yaml").trainer.max_steps for s in ("align", "instruct")}
    assert trained == {"align": 2 * own["align"], "instruct": 4 * own["instruct"]}
    assert main(["demo", "--quick", "--long"]) == 2
    assert "choose one" in capsys.readouterr().err


def test_demo_practice_trains_on_the_practice_world_recolours_instruct_and_polishes_on_scored_domains(monkeypatch, tmp_path, capsys):
    """`demo --practice`: every stage trains the history demo's model on the practice world's manifest
    and vocabulary; the instruct stage (action texts) sees recoloured clips; the polish stage goes on
    from the instruct checkpoint on the scored domains alone, at its own learning rate and share of steps,
    with its own drafts as later rounds' given frames, and writes the average of its weights."""
    import pandora_lightning.world.demo as demo
    from pandora_lightning.cli import main

    class Trained(Exception):
        pass

    seen, worlds = {}, []

    def fake_fit(recipe, callbacks=(), overwrite=False):
        stage = Path(recipe.run_dir).name
        seen[stage] = (recipe.stage, recipe.data.manifest, recipe.vocabulary, recipe.data.recolor, recipe.data.recolor_avoid,
                       list(recipe.data.domains), recipe.init_from, recipe.optim.lr, recipe.trainer.max_steps, recipe.data.batch_size,
                       recipe.trainer.ema_decay, recipe.model.generator.cond_draft, recipe.model.generator.cond_draft_noise)
        # the history demo's model, on windows of a whole 3-round training episode of the practice world
        assert (recipe.data.rounds, recipe.model.llm.history_rounds, recipe.model.llm.previous_answer) == (3, 3, True)
        if stage == "polish":
            raise Trained
        return tmp_path / f"{stage}.safetensors"

    monkeypatch.setattr(demo, "ensure_world", lambda manifest, shards, counts, per, cfg: worlds.append((manifest, counts, cfg)))
    monkeypatch.setattr(demo, "fit", fake_fit)
    # a polish learning rate unlike the recipe's own (the landed one equals it), so the override is seen
    monkeypatch.setitem(demo.PRACTICE, "polish", {**demo.PRACTICE["polish"], "lr": 2.5e-4})
    with pytest.raises(Trained):
        demo.run_demo(tmp_path / "run", practice=True, long=True)
    manifest, counts, cfg = worlds[0]
    assert manifest == demo.PRACTICE["manifest"] and counts["practice"] > 0 and cfg.practice
    vocabulary = "data_manifests/world-practice.vocab.txt"
    sand = demo.transfer_look()
    assert sand == [218, 182, 125]  # the desert's mean colour
    own = load_recipe("recipes/tiny-history/instruct.yaml")
    instruct_steps = 4 * own.trainer.max_steps
    polish = demo.PRACTICE["polish"]
    assert polish["lr"] != own.optim.lr and polish["batch_size"] != own.data.batch_size
    assert seen["align"][:6] == ("align", manifest, vocabulary, 0.0, [], [])
    assert seen["instruct"] == ("instruct", manifest, vocabulary, demo.PRACTICE["recolor"], [sand], [],
                                str(tmp_path / "align.safetensors"), own.optim.lr, instruct_steps, own.data.batch_size, 0.0, 0.0, 1.0)
    assert seen["polish"] == ("instruct", manifest, vocabulary, polish["recolor"], [sand], ["meadow", "space", "ocean", "desert"],
                              str(tmp_path / "instruct.safetensors"), polish["lr"], round(instruct_steps * polish["share"]),
                              polish["batch_size"], polish["ema_decay"], polish["draft"], polish["draft_noise"])
    assert 0 < polish["ema_decay"] < 1 and polish["draft"] > 0 and polish["draft_noise"] < 1
    assert not set(seen["polish"][5]) & set(PRACTICE_DOMAINS)
    assert main(["demo", "--history", "--practice"]) == 2
    assert "choose one" in capsys.readouterr().err
