"""Precomputed inputs: `shards encode` + data.precomputed train to the same losses as raw frames, without the encoders."""
from __future__ import annotations

import csv

import pytest
import torch

from pandora_lightning.cli import main
from pandora_lightning.data.manifest import load_manifest, write_manifest
from pandora_lightning.errors import PandoraError
from pandora_lightning.training.checkpoint import load_stage
from pandora_lightning.training.fit import fit
from pandora_lightning.training.stage import STAGES
from tests.conftest import RECIPES, tiny_recipe
from tests.generator_folders import i2vgen_xl

TRAIN = "trainable=[input_adapter.*,llm.query_tokens,llm.model.*lora_*,output_adapter.*,generator.unet.*]"


def i2v_overrides(folder) -> list[str]:
    """The tiny instruct recipe around an i2vgen-xl folder (VAE, CLIP image encoder, CLIP text teacher)."""
    return ["init_from=null", f"model.generator.pretrained={folder}", "model.generator.frames=3", "model.generator.cond_frames=1",
            "model.output_adapter.num_queries=16", "model.generator.height=16", "model.generator.width=16", TRAIN,
            "trainer.max_steps=2"]


@pytest.fixture(scope="module")
def one_set(world_manifest, tmp_path_factory):
    """The test world's first train set alone (8 clips): encoding is the slow part of these tests."""
    world = load_manifest(world_manifest)
    first = world.sets_for("train")[0]
    root = (world_manifest.parent / world.root).resolve()
    record = {"split": "train", "domain": first.domain, "shards": list(first.shards), "samples": first.samples}
    path = tmp_path_factory.mktemp("one-set") / "one.yaml"
    return type(world_manifest)(write_manifest(path, "one", root, [record]).path)


@pytest.fixture(scope="module")
def encoded(one_set, tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute")
    folder = i2vgen_xl(root / "i2vgen-xl")
    out = root / "encoded"
    args = ["shards", "encode", str(one_set), *i2v_overrides(folder), "trainer.precision=32-true",  # as tiny_recipe
            "--recipe", str(RECIPES / "tiny" / "instruct.yaml"), "--out", str(out), "--split", "train", "--quiet"]
    assert main(args) == 0
    return folder, out / "manifest.yaml"


def losses(run_dir) -> list[float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_losses_from_precomputed_shards_equal_losses_from_frames(encoded, one_set, tmp_path):
    folder, manifest = encoded
    record = load_manifest(manifest).encoding
    assert record.family == "i2vgen-xl" and not record.needs_frames and (record.height, record.width) == (16, 16)
    assert set(record.encoders) == {"vision", "generator.vae", "generator.image_encoder", "text_encoder"}
    raw = tiny_recipe("instruct", one_set, tmp_path / "raw", *i2v_overrides(folder))
    pre = tiny_recipe("instruct", manifest, tmp_path / "pre", *i2v_overrides(folder), "data.precomputed=true")
    fit(raw)
    final = fit(pre)
    a, b = losses(tmp_path / "raw"), losses(tmp_path / "pre")
    print(f"\nlosses from frames      {a}\nlosses from precomputed {b}")
    assert len(a) == len(b) == 2
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)
    # the model file of a precomputed run is a whole model again: its encoders come back from their folders
    model = load_stage(final).model
    assert model.vision is not None and model.generator.vae is not None and model.text_encoder is not None


def test_the_encoders_are_not_in_the_precomputed_model(encoded, world_manifest, tmp_path):
    folder, manifest = encoded
    full = STAGES["instruct"].from_recipe(tiny_recipe("instruct", world_manifest, tmp_path / "a", *i2v_overrides(folder)))
    pre = STAGES["instruct"].from_recipe(tiny_recipe("instruct", manifest, tmp_path / "b", *i2v_overrides(folder),
                                                     "data.precomputed=true"))
    left_out = ("vision.", "text_encoder.", "generator.vae.", "generator.image_encoder.")
    assert pre.model.vision is None and pre.model.text_encoder is None
    assert pre.model.generator.vae is None and pre.model.generator.image_encoder is None
    assert not [n for n, _ in pre.named_parameters() if n.removeprefix("model.").startswith(left_out)]
    full_names = {n for n, _ in full.named_parameters()}
    assert {n for n, _ in pre.named_parameters()} == {n for n in full_names if not n.removeprefix("model.").startswith(left_out)}
    assert pre.trainable_names == full.trainable_names
    saved = sum(p.numel() for n, p in full.named_parameters() if n.removeprefix("model.").startswith(left_out))
    assert sum(p.numel() for p in pre.parameters()) == sum(p.numel() for p in full.parameters()) - saved > 0


def test_mismatched_manifests_and_trained_encoders_are_refused(encoded, world_manifest, tmp_path):
    folder, manifest = encoded
    cases = [
        (world_manifest, [], "holds no precomputed inputs; write them with `pandora-lightning shards encode"),
        (manifest, ["model.generator.height=32", "model.generator.width=32"],
         "was encoded at 16x16, 3 frames with 1 given, but this recipe takes 32x32"),
        (manifest, ["model.vision.hidden_size=64"], "was encoded by another vision"),
    ]
    for i, (source, extra, message) in enumerate(cases):
        recipe = tiny_recipe("instruct", source, tmp_path / str(i), *i2v_overrides(folder), "data.precomputed=true", *extra)
        with pytest.raises(PandoraError, match=message):
            fit(recipe)
    # the tiny align recipe trains its text encoder: precomputed inputs cannot stand in for it
    recipe = tiny_recipe("align", manifest, tmp_path / "align", "data.precomputed=true")
    with pytest.raises(PandoraError, match="data.precomputed: the recipe trains text_encoder .*trainable pattern 'text_encoder"):
        fit(recipe)


def test_plan_precomputed_rows_take_off_what_the_switch_leaves_out(encoded, world_manifest, tmp_path):
    from pandora_lightning.training import plan

    folder, _ = encoded
    recipe = tiny_recipe("instruct", world_manifest, tmp_path, *i2v_overrides(folder))
    full = plan.build_on_meta(recipe)
    left_out = ("vision.", "text_encoder.", "generator.vae.", "generator.image_encoder.")
    expected = sum(p.numel() for n, p in full.model.named_parameters() if n.startswith(left_out))
    made = plan.make_plan(recipe, gpus=1)
    assert made["no_precomputed"] is None and made["counts"].frozen_inputs == expected > 0
    rows = {s.name: m for s, m in made["rows"]}
    assert rows["ddp + precomputed"]["static"] < rows["ddp"]["static"]
    # a recipe that trains its text encoder (tiny align) gets no precomputed rows, and says why
    align = plan.make_plan(tiny_recipe("align", world_manifest, tmp_path / "align"), gpus=1)
    assert not any(s.precomputed for s, _ in align["rows"]) and "trains text_encoder" in align["no_precomputed"]


def test_tiny_recipe_from_align_checkpoint_pixels_kept_and_model_file_whole(align_checkpoint, one_set, tmp_path):
    """The tiny generator has no VAE (its frames still come from the mp4); the vision tower and the text
    encoder are the align checkpoint's (known by their tensors), and come back in the model file."""
    start = [f"init_from={align_checkpoint}"]
    out = tmp_path / "encoded"
    assert main(["shards", "encode", str(one_set), *start, "trainer.precision=32-true", "--recipe", str(RECIPES / "tiny" / "instruct.yaml"),
                 "--out", str(out), "--split", "train", "--quiet"]) == 0
    record = load_manifest(out / "manifest.yaml").encoding
    assert record.needs_frames and set(record.encoders) == {"vision", "text_encoder"}
    assert all(v.startswith("tensors:") for v in record.encoders.values())
    fit(tiny_recipe("instruct", one_set, tmp_path / "raw", *start))
    final = fit(tiny_recipe("instruct", out / "manifest.yaml", tmp_path / "pre", *start, "data.precomputed=true"))
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "pre")), torch.tensor(losses(tmp_path / "raw")), rtol=1e-5, atol=1e-6)
    whole, aligned = load_stage(final).model, load_stage(align_checkpoint).model
    for name in ("vision", "text_encoder"):
        for (key, a), b in zip(getattr(whole, name).state_dict().items(), getattr(aligned, name).state_dict().values()):
            assert torch.equal(a, b), key
    # without the align checkpoint the text encoder is a fresh random one, not the one the shards were encoded by
    with pytest.raises(PandoraError, match="encoded by another text_encoder .other tensors. than this recipe's .its own tensors."):
        fit(tiny_recipe("instruct", out / "manifest.yaml", tmp_path / "seed", "init_from=null", "data.precomputed=true"))
