"""The reference-scale recipes: required folders, and the whole 9.1 B model built on the meta device
from config-only folders, counted per component against the published sizes."""
import pytest
import torch

from pandora_lightning.errors import PandoraError
from pandora_lightning.models.world_model import WorldModel
from pandora_lightning.recipe import load_recipe
from tests.conftest import RECIPES
from pandora_lightning.bench.reference import PUBLISHED, PUBLISHED_TOTAL, write_reference_folders


@pytest.mark.parametrize("stage", ["align", "instruct"])
def test_reference_recipes_name_the_folders_they_need(stage):
    with pytest.raises(PandoraError, match=r"'data.manifest', 'model.generator.pretrained', 'model.llm.pretrained', 'model.text_encoder.pretrained', 'model.vision.pretrained' are required; give them on the command line as data.manifest=..."):
        load_recipe(RECIPES / "pandora-7b" / f"{stage}.yaml")


def test_reference_model_builds_on_the_meta_device_at_the_published_size(tmp_path):
    folders = write_reference_folders(tmp_path)
    recipe = load_recipe(RECIPES / "pandora-7b" / "instruct.yaml",
                         [f"model.{slot}.pretrained={path}" for slot, path in folders.items()] + ["data.manifest=none.yaml"])
    with pytest.raises(PandoraError, match="holds a config but no weights.*model.weights=random"):
        WorldModel(recipe.model)
    model = WorldModel(recipe.model, meta=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.pretrained_modules() == {}, "nothing is read on the meta device"
    sizes = model.component_sizes()
    total = sum(sizes.values())
    print("\ncomponent             parameters   published")
    for name, count in sizes.items():
        print(f"{name:<20} {count / 1e6:>10.1f} M {PUBLISHED.get(name, '-'):>8} M")
    print(f"{'total':<20} {total / 1e9:>10.3f} B {PUBLISHED_TOTAL / 1e3:>8} B")
    for name, published in PUBLISHED.items():
        assert abs(sizes[name] / 1e6 - published) <= 0.01 * published, f"{name}: {sizes[name]:,} vs {published} M"
    assert abs(total / 1e6 - PUBLISHED_TOTAL) <= 0.01 * PUBLISHED_TOTAL
    # the reference's shapes: 112 tokens a frame from CLIP's 16x16 grid, 77 x 1024 generator context
    assert model.vision.grid(320, 512) == (16, 16) and model.generator.context_dim == 1024
    assert model.output_adapter.queries.shape == (1, 77, 768) and model.llm.query_tokens.shape == (64, 4096)
