"""LoRA per component with peft: default targets, adapter folders that plain peft opens, several
adapters on one base, merging, and the errors for adapters that do not fit."""
import copy
import json

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from peft import PeftModel
from transformers import AutoModelForCausalLM

from pandora_lightning.errors import PandoraError
from pandora_lightning.models.llm import LLMConfig
from pandora_lightning.models.world_model import WorldModel, WorldModelConfig
from pandora_lightning.training.adapters import META, attach_adapters, fingerprint, load_adapter, save_adapter
from pandora_lightning.training.lora import add_lora, lora_base, merge_lora, use_adapter
from pandora_lightning.training.recipe import ComponentLora, LoraConfig
from pandora_lightning.world.vocabulary import world_vocabulary

TEXTS = ["move left", "grow bigger"]


def tiny_model(seed: int = 0) -> WorldModel:
    torch.manual_seed(seed)
    return WorldModel(WorldModelConfig(), world_vocabulary()).eval()


def lora(name="desert", rank=4, **parts) -> LoraConfig:
    parts = parts or {"llm": {}, "generator": {}, "output_adapter": {}}
    return LoraConfig(name=name, **{c: ComponentLora(rank=rank, **kw) for c, kw in parts.items()})


def adapted(base: WorldModel, cfg: LoraConfig, seed: int = 1) -> WorldModel:
    """A copy of `base` with adapter cfg.name, its LoRA B matrices random (as if trained)."""
    model = copy.deepcopy(base)
    add_lora(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f"lora_B.{cfg.name}." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model


def inputs(model: WorldModel):
    torch.manual_seed(5)
    given = torch.rand(2, model.cond_frames, 3, 32, 32) * 2 - 1
    latents = torch.randn(2, model.cfg.generator.frames, model.generator.channels, 16, 16)
    return given, latents


def outputs(model: WorldModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The LLM path's context and one denoiser call: every adapted component on the way."""
    given, latents = inputs(model)
    with torch.no_grad():
        context = model.context(given, TEXTS)
        cond = model.generator.condition(latents)
        return context, model.generator.denoise(latents, torch.tensor([500, 20]), cond, context)


def test_default_targets_are_spatial_and_temporal_attention():
    model = tiny_model()
    layers = add_lora(model, lora(generator={}, llm={}, output_adapter={}))
    gen = layers["generator"]
    assert any(".transformer_blocks.0.attn1.to_q" in n for n in gen)  # spatial self-attention
    assert any(".transformer_blocks.0.attn2.to_k" in n for n in gen)  # spatial cross-attention
    assert any(".temporal_transformer_blocks.0.attn1.to_out.0" in n for n in gen)  # temporal
    assert not any(".ff." in n or "proj_in" in n for n in gen)
    assert {n.rsplit(".", 1)[1] for n in layers["llm"]} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert any("crossattention.attention.query" in n for n in layers["output_adapter"])
    with_ff = add_lora(tiny_model(), lora(generator={"feed_forward": True}))["generator"]
    assert any(n.endswith("ff.net.0.proj") for n in with_ff) and any(n.endswith("ff_in.net.2") for n in with_ff)
    only = add_lora(tiny_model(), lora(generator={"target_modules": ["re:.*temporal_transformer_blocks.*attn1.to_v"]}))
    assert only["generator"] and all("temporal" in n and n.endswith("attn1.to_v") for n in only["generator"])


def test_target_modules_matching_nothing_names_the_layers():
    with pytest.raises(PandoraError, match=r"lora.generator.target_modules \['to_qq'\] match no layer.*to_q, to_k") as err:
        add_lora(tiny_model(), lora(generator={"target_modules": ["to_q", "to_qq"]}))
    assert "\n" not in str(err.value)


def test_adapter_folder_opens_with_plain_peft(tmp_path):
    base = tiny_model()
    model = adapted(base, lora())
    out = save_adapter(model, "desert", tmp_path / "adapter", base_checkpoint="base.ckpt")
    for component in ("llm", "generator", "output_adapter"):
        assert (out / component / "adapter_config.json").is_file() and (out / component / "adapter_model.safetensors").is_file()
    assert json.loads((out / META).read_text())["name"] == "desert"
    # The LLM: a plain transformers folder + plain peft, nothing of this project.
    base.llm.model.save_pretrained(tmp_path / "llm")
    llm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "llm"), str(out / "llm")).eval()
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(llm(input_ids=ids).logits, model.llm.model(input_ids=ids).logits)
        assert (llm(input_ids=ids).logits - base.llm.model(input_ids=ids).logits).abs().max() > 1e-3
    # The generator's UNet: a plain diffusers folder + plain peft.
    base.generator.unet.save_pretrained(tmp_path / "unet")
    unet = PeftModel.from_pretrained(UNetSpatioTemporalConditionModel.from_pretrained(tmp_path / "unet"), str(out / "generator"))
    _, latents = inputs(base)
    sample = torch.cat([latents, model.generator.condition(latents)], dim=2)
    args = (sample, torch.tensor([500, 20]), torch.randn(2, 8, 64), model.generator.added_time_ids.expand(2, -1))
    with torch.no_grad():
        torch.testing.assert_close(unet.eval()(*args).sample, model.generator.unet(*args).sample, atol=1e-5, rtol=1e-5)
    # The output adapter is a plain nn.Module: peft wraps it all the same.
    plain = copy.deepcopy(base.output_adapter)
    wrapped = PeftModel.from_pretrained(plain, str(out / "output_adapter")).eval()
    states = torch.randn(2, 8, 64)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(states), model.output_adapter(states))


def test_loaded_adapter_is_applied(tmp_path):
    """Fails when an adapter is silently not applied: the loaded model must give the adapted outputs."""
    base = tiny_model()
    model = adapted(base, lora())
    save_adapter(model, "desert", tmp_path / "a", None)
    fresh = copy.deepcopy(base)
    before = outputs(fresh)
    assert load_adapter(fresh, tmp_path / "a") == "desert"
    use_adapter(fresh, "desert")
    after, want = outputs(fresh), outputs(model)
    for got, expected, plain in zip(after, want, before):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert (got - plain).abs().max() > 1e-2


def test_several_adapters_on_one_base(tmp_path):
    base = tiny_model()
    first, second = adapted(base, lora("desert"), seed=1), adapted(base, lora("robot", generator={}), seed=2)
    save_adapter(first, "desert", tmp_path / "desert", None)
    save_adapter(second, "robot", tmp_path / "robot", None)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path / "desert")
    load_adapter(model, tmp_path / "robot")
    load_adapter(model, tmp_path / "robot", name="robot2")
    for name, reference in (("robot", second), ("desert", first), (None, base), ("robot2", second)):
        use_adapter(model, name)
        for got, expected in zip(outputs(model), outputs(reference)):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_merged_equals_unmerged():
    model = adapted(tiny_model(), lora(generator={"feed_forward": True}, llm={}, output_adapter={}))
    unmerged = outputs(model)
    assert merge_lora(model) > 0
    assert not any("lora_" in n for n, _ in model.named_parameters())
    for got, expected in zip(outputs(model), unmerged):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_adapter_of_another_base_is_refused(tmp_path):
    save_adapter(adapted(tiny_model(seed=0), lora()), "desert", tmp_path / "a", "runs/x/instruct/checkpoints/final.safetensors")
    with pytest.raises(PandoraError, match=r"trained on another base llm \(base fingerprint .*runs/x/instruct") as err:
        load_adapter(tiny_model(seed=3), tmp_path / "a")
    assert "\n" not in str(err.value)
    wider = WorldModel(WorldModelConfig(llm=LLMConfig(hidden_size=32, num_heads=2)), world_vocabulary())
    with pytest.raises(PandoraError, match=r"another base llm \(layer model.layers.0.self_attn.\w_proj has 32 inputs here, the adapter's 64\)"):
        load_adapter(wider, tmp_path / "a")


def test_duplicate_adapter_names_are_refused(tmp_path):
    base = tiny_model()
    save_adapter(adapted(base, lora("desert")), "desert", tmp_path / "one", None)
    save_adapter(adapted(base, lora("desert"), seed=4), "desert", tmp_path / "two", None)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path / "one")
    with pytest.raises(PandoraError, match="two adapters are named 'desert'"):
        load_adapter(model, tmp_path / "two")

    class Stage:  # what attach_adapters needs of a stage module
        stage, model = "instruct", copy.deepcopy(base)

    with pytest.raises(PandoraError, match="two adapters are named 'desert'"):
        attach_adapters(Stage(), tmp_path / "x.ckpt", [str(tmp_path / "one"), str(tmp_path / "two")])
    assert attach_adapters(Stage(), tmp_path / "x.ckpt", [str(tmp_path / "one"), f"other={tmp_path / 'two'}"]) == ["desert", "other"]


def test_fingerprint_ignores_lora_and_storage_dtype():
    base = tiny_model()
    module = lora_base(adapted(base, lora()), "generator")
    assert fingerprint(module) == fingerprint(base.generator.unet)
    assert fingerprint(copy.deepcopy(base.generator.unet).to(torch.bfloat16)) == fingerprint(base.generator.unet)
    assert fingerprint(tiny_model(seed=1).generator.unet) != fingerprint(base.generator.unet)
