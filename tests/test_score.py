"""`pandora-lightning score`: the report, determinism, the pipeline on exact rollouts, bad input,
and scoring during fit."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pandora_lightning.cli import main
from pandora_lightning.data.dataset import iterate_split
from pandora_lightning.data.manifest import load_manifest, write_manifest
from pandora_lightning.data.frames import from_numpy, to_uint8
from pandora_lightning.evaluation.config import ScoreConfig, load_score_config
from pandora_lightning.evaluation.score import run_score
from pandora_lightning.evaluation.loop import load_episodes, run_episodes
from pandora_lightning.evaluation.suite import MetricSuite
from pandora_lightning.world.metrics import WORLD_METRICS
from pandora_lightning.training.checkpoint import load_checkpoint_file, load_stage
from pandora_lightning.recipe import score_callbacks
from pandora_lightning.training.fit import fit
from pandora_lightning.world import DOMAINS, ObjectState, parse_action, render_states, simulate, valid_actions
from tests.conftest import RECIPES, tiny_recipe
from tests.test_metrics import save_detector

METRICS = {"psnr", "ssim", "action_following", "action_following_lenient", "temporal_object", "temporal_background",
           "psnr_at_state"}


def score(args: list[str], capsys) -> tuple[int, str]:
    code = main(["score", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_score_writes_json_table_and_plots(align_checkpoint, world_manifest, tmp_path, capsys):
    code, out = score([str(align_checkpoint), "--manifest", str(world_manifest), "--per-domain", "1",
                       "--num-inference-steps", "1", "--out", str(tmp_path / "s")], capsys)
    assert code == 0, out
    scores = json.loads((tmp_path / "s" / "scores.json").read_text())
    assert list(scores["splits"]) == ["val", "transfer"], "both held-out splits by default, val first"
    val, transfer = scores["splits"]["val"], scores["splits"]["transfer"]
    assert val["episodes"] == 4 and val["rounds"] == 12 and transfer["episodes"] == 1
    assert set(val["metrics"]) == METRICS
    assert set(val["metrics"]["action_following"]["per_domain"]) == set(DOMAINS)
    assert set(transfer["metrics"]["action_following"]["per_domain"]) == {"desert"}
    assert len(val["metrics"]["psnr"]["per_round"]) == 3 and len(val["metrics"]["psnr"]["per_frame"]) == 12
    assert "fvd" in scores["skipped"] and "fvd_detector" in scores["skipped"]["fvd"]
    assert "clip_model" in scores["skipped"]["clip_score"]
    table = (tmp_path / "s" / "scores.md").read_text()
    assert "## val: 4 episodes, 12 rounds" in table and "| meadow |" in table and "## Skipped" in table
    for png in ("domains.png", "rounds.png"):
        assert Image.open(tmp_path / "s" / png).size[0] >= 340
    assert "action following" in out and "(chance " in out and str(tmp_path / "s") in out


def test_fixed_seed_gives_the_same_scores(align_checkpoint, world_manifest, tmp_path):
    cfg = dict(checkpoint=str(align_checkpoint), manifest=str(world_manifest), splits=["transfer"], per_domain=2,
               batch_size=2, num_inference_steps=1)
    first = run_score(ScoreConfig(**cfg, out=str(tmp_path / "a")))["splits"]["transfer"]["metrics"]
    again = run_score(ScoreConfig(**cfg, out=str(tmp_path / "b")))["splits"]["transfer"]["metrics"]
    other = run_score(ScoreConfig(**cfg, out=str(tmp_path / "c"), seed=1))["splits"]["transfer"]["metrics"]
    assert first == again
    assert first["psnr"] != other["psnr"], "the seed reaches the sampler"


def test_score_recipe_with_overrides(align_checkpoint, world_manifest, tmp_path, capsys):
    code, out = score(["--recipe", str(RECIPES / "tiny" / "score.yaml"), f"checkpoint={align_checkpoint}",
                       f"manifest={world_manifest}", "splits=[transfer]", "per_domain=1", "num_inference_steps=1",
                       f"out={tmp_path}"], capsys)
    assert code == 0, out
    assert list(json.loads((tmp_path / "scores.json").read_text())["splits"]) == ["transfer"]
    code, out = score(["--recipe", str(RECIPES / "tiny" / "score.yaml"), "per_domian=1"], capsys)
    assert code == 2 and "unknown key 'per_domian' (did you mean per_domain?)" in out
    with pytest.raises(ValueError, match="no checkpoint given"):
        load_score_config(None, [], {})


class SimulatedRollout(torch.nn.Module):
    """A stand-in model that renders the world exactly: `follow=True` does what each action says,
    `follow=False` ignores the text and does a random valid action."""

    cond_frames, new_frames = 2, 4

    def __init__(self, episodes, follow: bool):
        super().__init__()
        self.starts = {frames[0].tobytes(): meta for _, frames, meta in episodes}
        self.follow = follow

    def rollout(self, start: torch.Tensor, actions: list[list[str]], seed: int = 0) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        videos = []
        for b, first in enumerate(to_uint8(start).movedim(1, -1).numpy()):
            meta = self.starts[first.tobytes()]
            domain = DOMAINS[meta["domain"]]
            x, y, radius, *color = meta["states"][0]
            states = [ObjectState(x, y, radius, tuple(int(c) for c in color))] * self.cond_frames
            for texts in actions:
                options = valid_actions(domain, states[-1], self.new_frames, 32)
                action = parse_action(texts[b]) if self.follow else options[int(rng.integers(len(options)))]
                states += simulate(domain, states[-1], action, self.new_frames)
            videos.append(render_states(domain, states, 32))
        return from_numpy(np.stack(videos))


@pytest.mark.parametrize("follow", [True, False])
def test_scoring_exact_rollouts(world_manifest, follow):
    episodes = list(iterate_split(load_manifest(world_manifest), "val"))
    model = SimulatedRollout(episodes, follow)
    suite = MetricSuite(episodes, model.cond_frames, model.new_frames, plugins=[WORLD_METRICS])
    rounds = run_episodes(model, episodes, suite, batch_size=3, rollout_fn=lambda m, start, actions, seed: m.rollout(start, actions, seed))
    metrics = suite.report()
    assert rounds == 8 * 3
    assert metrics["temporal_object"]["overall"] == 1.0 and metrics["temporal_background"]["overall"] == 1.0
    if follow:
        assert metrics["action_following"]["overall"] == 1.0
        assert metrics["psnr"]["overall"] > 35 and metrics["ssim"]["overall"] > 0.95
    else:  # a model that ignores the action: near chance (about 1/5 over the valid actions)
        assert metrics["action_following"]["overall"] < 0.5
        assert metrics["psnr"]["overall"] < 30


def test_demo_evaluation_uses_the_metric(align_checkpoint, world_manifest, tmp_path):
    model = load_stage(align_checkpoint).model
    model.generator.cfg.num_inference_steps = 1
    episodes = load_episodes(load_manifest(world_manifest), "transfer", 1, model.cfg.generator.size)
    suite = MetricSuite(episodes, model.cond_frames, model.new_frames, plugins=[WORLD_METRICS])
    run_episodes(model, episodes, suite, batch_size=1, media_dir=tmp_path, name="transfer")
    report = suite.report()["action_following"]
    assert report["count"] == 3 and set(report["per_domain"]) == {"desert"}
    assert len(list(tmp_path.glob("*.mp4"))) == 1 and (tmp_path / "transfer-sheet-000.png").is_file()


def _modified_checkpoint(source, path, **meta):
    ckpt = load_checkpoint_file(source)  # the model file, as a checkpoint dict
    ckpt["hyper_parameters"].update(meta)
    torch.save(ckpt, path)
    return str(path)


def test_bad_input_is_named(align_checkpoint, world_manifest, tmp_path, capsys):
    common = ["--manifest", str(world_manifest), "--per-domain", "1", "--out", str(tmp_path / "out")]
    cases = [
        ([_modified_checkpoint(align_checkpoint, tmp_path / "pretrain.ckpt", stage="pretrain"), *common],
         "pretrain.ckpt' is from an unknown stage 'pretrain'"),
        ([_modified_checkpoint(align_checkpoint, tmp_path / "old.ckpt", version="0.0.3"), *common],
         "old.ckpt' was written by pandora-lightning 0.0.3"),
        ([str(tmp_path / "none.ckpt"), *common], "none.ckpt' does not exist"),
        ([str(align_checkpoint), *common, "--split", "test"], "no shard sets for split 'test'"),
    ]
    torch.save({"conv": torch.zeros(1)}, tmp_path / "weights.pt")
    cases.append(([str(align_checkpoint), *common, "--fvd-detector", str(tmp_path / "weights.pt")],
                  "weights.pt' is not a TorchScript file"))
    small = save_detector(tmp_path / "small.pt", features=16)
    cases.append(([str(align_checkpoint), *common, "--fvd-detector", small],
                  "small.pt' gives features of shape (1, 16); expected (batch, 400)"))
    # A manifest of the same shards without its held-out splits.
    manifest = load_manifest(world_manifest)
    train_only = [{"split": s.split, "domain": s.domain, "shards": s.shards, "samples": s.samples}
                  for s in manifest.sets if s.split == "train"]
    shards = world_manifest.parent / "shards"
    path = write_manifest(tmp_path / "train-only.yaml", "world", shards, train_only).path
    cases.append(([str(align_checkpoint), "--manifest", path], f"manifest {path} has no held-out samples"))
    for args, message in cases:
        code, out = score(args, capsys)
        assert code == 2 and message in out, (args, out)
        assert out.count("\n") == 1, "one line"


def test_fvd_through_the_command(align_checkpoint, world_manifest, tmp_path, capsys):
    detector = save_detector(tmp_path / "i3d.pt", features=16)
    code, out = score([str(align_checkpoint), "--manifest", str(world_manifest), "--split", "transfer", "--per-domain", "2",
                       "--num-inference-steps", "1", "--fvd-detector", detector, "--fvd-feature-dim", "16",
                       "--out", str(tmp_path)], capsys)
    assert code == 0, out
    scores = json.loads((tmp_path / "scores.json").read_text())
    fvd = scores["splits"]["transfer"]["metrics"]["fvd"]
    assert fvd["overall"] > 0 and fvd["count"] == 2 and set(fvd["per_domain"]) == {"desert"}
    assert "fvd" not in scores["skipped"]


def test_scores_are_logged_during_fit(world_manifest, tmp_path):
    recipe = tiny_recipe("align", world_manifest, tmp_path / "align", "eval.every_n_steps=1", "eval.split=transfer",
                         "eval.per_domain=1", "model.generator.num_inference_steps=1")
    fit(recipe, score_callbacks(recipe, [WORLD_METRICS]))
    lines = (tmp_path / "align" / "logs" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    column = header.index("score/action_following")
    steps = [int(row.split(",")[header.index("step")]) for row in lines[1:] if row.split(",")[column]]
    assert steps == [1, 2]
    assert {"score/psnr", "score/temporal_object"} <= set(header)
