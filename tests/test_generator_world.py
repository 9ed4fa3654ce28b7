"""A world model around each generator family, from a tiny fp16 folder in the release's layout, through the recipes."""
from __future__ import annotations

import pytest
import torch

from pandora_lightning.errors import PandoraError
from pandora_lightning.inference.rollout import rollout
from pandora_lightning.models.generator import GeneratorConfig
from pandora_lightning.models.output_adapter import OutputAdapterConfig
from pandora_lightning.models.text_encoder import TextEncoderConfig
from pandora_lightning.models.world_model import WorldModel, WorldModelConfig
from pandora_lightning.training.checkpoint import load_stage
from pandora_lightning.training.fit import fit
from tests.conftest import tiny_recipe
from tests.generator_folders import i2vgen_xl, svd, wan

ADAPTERS = "input_adapter.*,llm.query_tokens,output_adapter.*"
# family -> (folder builder, backbone glob, recipe overrides shared by both stages)
FAMILIES = {
    # the CLIP text encoder of the folder is the align teacher; its tokenizer pads to 16 tokens
    "i2vgen-xl": (i2vgen_xl, "generator.unet.*", ["model.generator.frames=3", "model.generator.cond_frames=1",
                                                 "model.output_adapter.num_queries=16"]),
    # no text encoder: align trains the adapters through the frozen generator with the diffusion loss
    "svd": (svd, "generator.unet.*", ["model.generator.frames=3", "model.generator.cond_frames=1", "model.text_encoder.enabled=false",
                                     "loss.distill_weight=0", "loss.context=adapter"]),
    # the UMT5 encoder is the teacher; a text-to-video transformer: 1 + 4k frames, the given latent frame kept clean
    "wan": (wan, "generator.transformer.*", ["model.generator.frames=5", "model.generator.cond_frames=1",
                                            "model.output_adapter.num_queries=16"]),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_world_model_trains_both_stages_and_rolls_out(family, world_manifest, tmp_path):
    build, backbone, overrides = FAMILIES[family]
    folder = build(tmp_path / family)
    common = [f"model.generator.pretrained={folder}", "model.generator.num_inference_steps=2", *overrides]
    align = fit(tiny_recipe("align", world_manifest, tmp_path / "align", f"trainable=[{ADAPTERS},llm.model.model.*]",
                            *common, *(["loss.context=teacher"] if family != "svd" else [])))
    instruct = fit(tiny_recipe("instruct", world_manifest, tmp_path / "instruct", f"init_from={align}",
                               f"trainable=[{ADAPTERS},llm.model.*lora_*,{backbone}]", *common))
    stage = load_stage(instruct)
    model = stage.model
    assert model.generator.family == family and model.generator.guidance_scale > 1  # the family's own default guidance
    trained = getattr(model.generator, backbone.split(".")[1])
    assert next(trained.parameters()).dtype == torch.float32  # the fp16 folder trains in fp32
    start = torch.rand(1, 3, 16, 32) * 2 - 1  # non-square
    video = rollout(model, start, [["move left"], ["grow"]], seed=1)
    k, n = model.cond_frames, model.new_frames
    assert video.shape == (1, k + 2 * n, 3, 16, 32) and torch.isfinite(video).all()
    torch.testing.assert_close(video[:, 0], start)


def test_bad_generator_folders_and_sizes_are_one_clear_line(tmp_path):
    svd_folder, wan_folder = svd(tmp_path / "svd"), wan(tmp_path / "wan")
    (tmp_path / "other" / "unet").mkdir(parents=True)
    (tmp_path / "other" / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    cases = [
        (dict(generator=GeneratorConfig(pretrained=str(tmp_path / "other"))),
         "cannot tell its family; looked for model_index.json naming I2VGenXLPipeline"),
        (dict(generator=GeneratorConfig(family="i2vgen-xl", pretrained=str(svd_folder))),
         "generator.family=i2vgen-xl but .* holds a svd model"),
        (dict(generator=GeneratorConfig(pretrained=str(svd_folder)), output_adapter=OutputAdapterConfig(context_dim=1024)),
         r"output_adapter.context_dim=1024 but the svd generator's cross-attention takes 32-wide context \(unet/config.json "
         r"cross_attention_dim\); set model.output_adapter.context_dim=32"),
        (dict(generator=GeneratorConfig(pretrained=str(wan_folder), frames=6, cond_frames=1)),
         "generator.frames and generator.cond_frames must be 1 \\+ 4k"),
        (dict(generator=GeneratorConfig(pretrained=str(wan_folder), frames=5, cond_frames=1, height=24, width=24)),
         "wan takes frame heights and widths that are multiples of 16"),
    ]
    for kwargs, message in cases:
        with pytest.raises(PandoraError, match=message):
            WorldModel(WorldModelConfig(**kwargs))
    with pytest.raises(PandoraError, match="family svd has no text encoder to distill from"):
        WorldModel(WorldModelConfig(generator=GeneratorConfig(pretrained=str(svd_folder), frames=3, cond_frames=1),
                                    text_encoder=TextEncoderConfig(enabled=True)))
