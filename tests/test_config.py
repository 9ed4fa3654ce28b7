from pathlib import Path

import pytest

from pandora_lightning.config import load_structured
from pandora_lightning.errors import PandoraError
from pandora_lightning.recipe import RecipeConfig, load_recipe
from pandora_lightning.data.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]


RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem != "score"], ids=lambda p: p.name)
def test_every_recipe_loads(path):
    # the reference recipes take their folders and manifest as required overrides
    required = [f"{key}=/given" for key in ("data.manifest", "model.llm.pretrained", "model.vision.pretrained",
                                             "model.generator.pretrained", "model.text_encoder.pretrained")]
    recipe = load_recipe(path, required if path.parent.name == "pandora-7b" else [])
    assert recipe.stage == path.stem, "a recipe file is named after its stage"
    # Several adapters share one base: each adapt run has a folder of its own name.
    adapter = f"/{recipe.lora.name}" if recipe.stage == "adapt" else ""
    assert recipe.run_dir == f"runs/{recipe.name}/{recipe.stage}{adapter}"


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem == "score"], ids=lambda p: str(p.parent.name))
def test_every_score_recipe_loads(path):
    from pandora_lightning.evaluation.config import load_score_config

    cfg = load_score_config(path)
    assert cfg.checkpoint.endswith(".safetensors") and cfg.manifest.endswith(".yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "data_manifests").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_manifest_loads(path):
    manifest = load_manifest(path, check_shards=False)  # shards are built by `make demo`, not committed
    assert manifest.sets and {"train", "val"} <= set(manifest.splits())
    assert all(s.samples > 0 and s.shards for s in manifest.sets)


def test_override_wins_over_yaml():
    recipe = load_recipe(ROOT / "recipes/tiny/align.yaml", ["trainer.max_steps=7", "model.llm.num_query_tokens=3"])
    assert recipe.trainer.max_steps == 7 and recipe.model.llm.num_query_tokens == 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_stepz=3", "unknown key 'trainer.max_stepz' (did you mean max_steps?)"),
        ("modle.llm.hidden_size=8", "unknown key 'modle' (did you mean model?)"),
        ("trainer.max_steps=many", "could not be converted to Integer (key 'trainer.max_steps')"),
        ("stage=finetune", "stage='finetune' is unknown"),
        ("model.generator.cond_frames=6", "cond_frames=6 must be in [1, generator.frames=6)"),
        ("model.generator.block_out_channels=[48,64]", "multiple of 32"),
        ("model.input_adapter.tokens_per_frame=0", "tokens_per_frame=0 must be >= 1"),
        ("loss.context=llm", "loss.context='llm' is unknown"),
        ("model.generator.guidance_scale=0.5", "guidance_scale=0.5 must be >= 1"),
        ("trainer.ema_decay=1.0", "trainer.ema_decay=1.0 must be in [0, 1)"),
    ],
)
def test_bad_recipe_values_name_the_key(override, message):
    with pytest.raises(PandoraError) as err:
        load_recipe(ROOT / "recipes/tiny/align.yaml", [override])
    assert message in str(err.value)
    assert "align.yaml" in str(err.value)


def test_distillation_without_a_text_encoder_is_refused():
    with pytest.raises(PandoraError, match="needs the generator's text encoder: set model.text_encoder.enabled=true"):
        load_recipe(ROOT / "recipes/tiny/align.yaml", ["model.text_encoder.enabled=false"])


def test_override_without_equals_sign():
    with pytest.raises(PandoraError, match="key=value"):
        load_structured(RecipeConfig, [["trainer.max_steps"]], "recipe")


def test_missing_recipe_file():
    with pytest.raises(PandoraError, match="does not exist"):
        load_recipe("recipes/none/align.yaml")
