"""export: a checkpoint as folders that plain transformers, diffusers and peft open, each part giving
what the project's model gives (to 1e-5), with LoRA as peft folders or merged into the weights."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLTemporalDecoder, UNet2DConditionModel, UNetSpatioTemporalConditionModel
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

from pandora_lightning.cli import main
from pandora_lightning.models.input_adapter import InputAdapter, InputAdapterConfig
from pandora_lightning.models.output_adapter import OutputAdapter, OutputAdapterConfig
from pandora_lightning.training.checkpoint import load_stage
from pandora_lightning.training.export import export_checkpoint

TEXTS = ["move left", "grow"]
CLOSE = dict(rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def exported(fp16_instruct, tmp_path_factory):
    ckpt, _ = fp16_instruct
    root = tmp_path_factory.mktemp("export")
    return export_checkpoint(ckpt, root / "lora"), export_checkpoint(ckpt, root / "merged", merge=True)


@pytest.fixture(scope="module")
def model(fp16_instruct):
    """The project's model of the checkpoint, in float32 with its LoRA running."""
    return load_stage(fp16_instruct[0], "cpu", "32-true").model


def llm_logits(llm, ids):
    with torch.no_grad():
        return llm(input_ids=ids).logits


def unet_out(unet, cfg):
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 3, cfg.in_channels, 8, 8, generator=gen)
    context = torch.randn(2, 5, cfg.cross_attention_dim, generator=gen)
    ids = torch.tensor([[6.0, 127.0, 0.02]] * 2)
    with torch.no_grad():
        return unet(sample, torch.tensor([900.0, 20.0]), context, ids).sample


def test_export_writes_what_the_manifest_lists(exported):
    plain, merged = exported
    manifest = json.loads((plain / "export.json").read_text())
    assert manifest["adapters"] == {"default": {"llm": "lora/default/llm", "generator": "lora/default/generator"}}
    parts = manifest["parts"]
    # dtype auto: a part as its folder stores it (fp16) unless training or a merge changed it
    assert (parts["llm"]["dtype"], parts["vision"]["dtype"], parts["generator"]["dtype"]) == ("float16", "float16", "float32")
    assert set(parts["generator"]["copied_from_source"]) >= {"model_index.json", "vae", "scheduler", "image_encoder"}
    for part in parts.values():
        assert (plain / part["path"]).exists(), part
    assert "PeftModel.from_pretrained" in (plain / "README.md").read_text()
    manifest = json.loads((merged / "export.json").read_text())
    assert manifest["merged"] and manifest["merged_adapter"] == "default" and manifest["adapters"] == {}
    assert not (merged / "lora").exists() and manifest["parts"]["llm"]["dtype"] == "float32"


def test_llm_and_its_lora_open_with_plain_transformers_and_peft(exported, model):
    plain, merged = exported
    tokenizer = AutoTokenizer.from_pretrained(plain / "llm")
    ids = tokenizer(TEXTS, padding=True, return_tensors="pt").input_ids
    assert torch.equal(ids, model.llm.tokenizer(TEXTS, padding=True, return_tensors="pt").input_ids)
    base = AutoModelForCausalLM.from_pretrained(plain / "llm", dtype=torch.float32)
    assert isinstance(base, LlamaForCausalLM)
    ours = llm_logits(model.llm.model, ids)
    peft = PeftModel.from_pretrained(base, str(plain / "lora" / "default" / "llm")).eval()
    torch.testing.assert_close(llm_logits(peft, ids), ours, **CLOSE)
    with peft.disable_adapter():
        assert (llm_logits(peft, ids) - ours).abs().max() > 1e-3, "the LoRA changes the LLM"
    folded = AutoModelForCausalLM.from_pretrained(merged / "llm").eval()
    assert not any("lora" in n for n, _ in folded.named_parameters())
    diff = (llm_logits(folded, ids) - ours).abs().max()
    print(f"LLM logits, merged vs unmerged LoRA: max abs difference {diff:.2e}")
    assert diff <= 1e-5


def test_generator_opens_with_plain_diffusers_and_peft(exported, model):
    plain, merged = exported
    ours = unet_out(model.generator.unet, model.generator.unet.config)
    unet = UNetSpatioTemporalConditionModel.from_pretrained(plain / "generator" / "unet")
    peft = PeftModel.from_pretrained(unet, str(plain / "lora" / "default" / "generator")).eval()
    torch.testing.assert_close(unet_out(peft, unet.config), ours, **CLOSE)
    folded = UNetSpatioTemporalConditionModel.from_pretrained(merged / "generator" / "unet").eval()
    diff = (unet_out(folded, folded.config) - ours).abs().max()
    print(f"UNet output, merged vs unmerged LoRA: max abs difference {diff:.2e}")
    assert diff <= 1e-5
    vae = AutoencoderKLTemporalDecoder.from_pretrained(plain / "generator" / "vae")
    own = model.generator.vae.state_dict()
    assert all(torch.equal(v.float(), own[k].float()) for k, v in vae.state_dict().items())


def test_vision_and_the_projects_own_parts_reopen(exported, model):
    plain, _ = exported
    tower = CLIPVisionModel.from_pretrained(plain / "vision", dtype=torch.float32).eval()
    assert (plain / "vision" / "preprocessor_config.json").is_file()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(tower(pixel_values=pixels).pooler_output, model.vision.tower(pixel_values=pixels).pooler_output, **CLOSE)
    config = json.loads((plain / "pandora" / "config.json").read_text())
    spec = config["input_adapter"]
    adapter = InputAdapter(InputAdapterConfig(**spec["config"]), spec["in_dim"], spec["out_dim"])
    adapter.load_state_dict(load_file(plain / "pandora" / "input_adapter.safetensors"))
    patches = torch.randn(2, 2, 4, 4, spec["in_dim"], generator=torch.Generator().manual_seed(2))
    spec = config["output_adapter"]
    out_adapter = OutputAdapter(OutputAdapterConfig(**spec["config"]), spec["in_dim"], spec["out_dim"]).eval()
    out_adapter.load_state_dict(load_file(plain / "pandora" / "output_adapter.safetensors"))
    states = torch.randn(2, config["query_tokens"]["num_query_tokens"], spec["in_dim"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(adapter(patches), model.input_adapter(patches), **CLOSE)
        torch.testing.assert_close(out_adapter(states), model.output_adapter(states), **CLOSE)
    queries = load_file(plain / "pandora" / "query_tokens.safetensors")["query_tokens"]
    assert torch.equal(queries, model.llm.query_tokens.detach())


def test_export_command_and_its_bad_input(align_checkpoint, tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["export", str(align_checkpoint), str(out)]) == 0
    assert f"exported {align_checkpoint}" in capsys.readouterr().out
    # The tiny recipe's parts are built from the recipe: written in float32, the word tokenizer beside the LLM.
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["parts"]["llm"]["dtype"] == "float32" and manifest["adapters"] == {}
    tiny = load_stage(align_checkpoint).model
    ids = AutoTokenizer.from_pretrained(out / "llm")(["move left"], return_tensors="pt").input_ids
    torch.testing.assert_close(llm_logits(AutoModelForCausalLM.from_pretrained(out / "llm"), ids),
                               llm_logits(tiny.llm.model, ids), **CLOSE)
    # The tiny recipes' generator is the 2d UNet (frames stacked as channels); the manifest names its class.
    assert manifest["parts"]["generator"]["class"] == "UNet2DConditionModel"
    unet = UNet2DConditionModel.from_pretrained(out / "generator" / "unet").eval()
    sample = torch.randn(2, unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 8, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(unet(sample, 500, context).sample, tiny.generator.unet(sample, 500, context).sample, **CLOSE)
    capsys.readouterr()  # transformers' loading bars
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")

    for args, message in [
        ([str(tmp_path / "missing.ckpt"), str(tmp_path / "x")], "missing.ckpt' does not exist"),
        ([str(align_checkpoint), str(out)], "tiny' exists and is not empty; pass --overwrite"),
        ([str(align_checkpoint), str(tmp_path / "y"), "--adapter", "nowhere"], "--adapter 'nowhere' is neither an adapter folder"),
        ([str(align_checkpoint), str(tmp_path / "z"), "--dtype", "float8"], "--dtype 'float8' is unknown"),
        ([str(align_checkpoint), str(tmp_path / "mine"), "--overwrite"], "holds files but no export.json; it is not replaced"),
    ]:
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["export", str(align_checkpoint), str(out), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "export.json").read_text())["parts"]["llm"]["dtype"] == "bfloat16"
