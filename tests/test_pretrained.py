"""Real-weight paths with tiny random folders saved as releases are (fp16, tokenizer, image processor,
diffusers layout): dtypes under each precision, checkpoints that hold only what was trained, their
fingerprints, and the errors a wrong folder gets."""
from __future__ import annotations

import shutil

import lightning as L
import pytest
import torch
from safetensors import safe_open

from pandora_lightning.errors import PandoraError
from pandora_lightning.inference.rollout import rollout
from pandora_lightning.recipe import load_recipe
from pandora_lightning.training.checkpoint import load_checkpoint_file, load_stage
from pandora_lightning.training.fit import fit
from pandora_lightning.training.stage import STAGES
from tests.conftest import RECIPES, tiny_recipe
from tests.pretrained_folders import folder_overrides, save_folders

TRAIN_ADAPTERS = "trainable=[input_adapter.*,llm.query_tokens,output_adapter.*,llm.model.*lora_*]"


@pytest.fixture(scope="module")
def fp16_folders(tmp_path_factory):
    return save_folders(tmp_path_factory.mktemp("fp16"), torch.float16)


class Keep(L.Callback):
    """Holds on to the trained module, to compare it with what is reloaded from the files."""

    def on_train_end(self, trainer, pl_module):
        self.module = pl_module


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fp16_llm_and_vision_tower_train_both_stages(fp16_folders, world_manifest, tmp_path, precision):
    """The Llama and CLIP folders are fp16; the tiny generator and text encoder are built here in fp32."""
    folders = {k: fp16_folders[k] for k in ("vision", "llm")}
    common = [f"model.vision.pretrained={folders['vision']}", f"model.llm.pretrained={folders['llm']}",
              f"trainer.precision={precision}"]
    align = fit(tiny_recipe("align", world_manifest, tmp_path / "align", *common,
                            "trainable=[input_adapter.*,llm.query_tokens,output_adapter.*,generator.unet.*,text_encoder.*]"))
    keep = Keep()
    fit(tiny_recipe("instruct", world_manifest, tmp_path / "instruct", *common, f"init_from={align}", "lora.llm.rank=4"),
        [keep])
    model = keep.module.model
    compute = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16}[precision]
    assert model.llm.model.get_input_embeddings().weight.dtype == compute, "frozen: the compute dtype"
    assert model.vision.tower.dtype == compute
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora), "trainable: float32"
    assert model.input_adapter.proj[0].weight.dtype == torch.float32
    for name in ("train/diffusion", "train/distill"):
        assert torch.isfinite(keep.module.trainer.callback_metrics[name])


def test_checkpoints_hold_only_what_was_trained(tmp_path_factory, world_manifest, tmp_path):
    folders = save_folders(tmp_path_factory.mktemp("all"), torch.float16)
    keep = Keep()
    common = [*folder_overrides(folders), "init_from=null", "lora.llm.rank=4", "trainer.checkpoint_every_n_steps=2",
              "model.generator.num_inference_steps=2"]
    final = fit(tiny_recipe("instruct", world_manifest, tmp_path / "run", *common,
                            "trainable=[input_adapter.*,llm.query_tokens,output_adapter.*,llm.model.*lora_*,generator.unet.*]"),
                [keep])
    module = keep.module.eval()
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    size = final.stat().st_size
    print(f"model file {size:,} bytes; trainable parameters {trainable:,} bytes ({size / trainable:.4f}x)")
    assert size <= 1.05 * trainable
    provided = module.model.provided_keys()
    assert any(k.startswith("llm.model.") for k in provided) and any(k.startswith("generator.vae.") for k in provided)
    with safe_open(str(final), "pt") as f:
        keys = set(f.keys())
    trained = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert keys == trained, "the model file holds the trained tensors, nothing else"
    last = load_checkpoint_file(tmp_path / "run" / "checkpoints" / "last.ckpt")
    saved = {k.removeprefix("model.") for k in last["state_dict"]}
    assert saved == trained and not saved & (provided - trained)
    assert last["optimizer_states"][0]["state"], "resume files keep the optimizer state"
    assert set(last["fingerprints"]) == {"vision.tower", "llm.model", "generator.unet", "generator.vae", "text_encoder.model"}

    start = torch.rand(2, 3, 32, 32) * 2 - 1
    actions = [["move left", "grow"], ["move up", "shrink"]]
    before = rollout(module.model, start, actions, seed=5)
    after = rollout(load_stage(final).model, start, actions, seed=5)
    torch.testing.assert_close(after, before, rtol=0, atol=0)

    # Resume from the trimmed file: the folders give back the rest.
    fit(tiny_recipe("instruct", world_manifest, tmp_path / "run", *common, "trainer.max_steps=3",
                    "trainable=[input_adapter.*,llm.query_tokens,output_adapter.*,llm.model.*lora_*,generator.unet.*]",
                    "trainer.resume_from=last"))
    assert load_checkpoint_file(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 3

    # A folder that changed since is named, in one line.
    config = folders["vision"] / "config.json"
    original = config.read_text()
    assert '"num_attention_heads": 2' in original
    config.write_text(original.replace('"num_attention_heads": 2', '"num_attention_heads": 4'))  # the same size
    with pytest.raises(PandoraError, match=r"vision.tower: pretrained folder '.*vision' changed since the checkpoint was "
                                           r"written: its config files differ"):
        load_stage(final)
    config.write_text(original)
    shutil.rmtree(folders["llm"])
    with pytest.raises(PandoraError, match=r"llm.model: pretrained folder '.*llm' does not exist"):
        load_stage(final)


def test_a_pickle_that_would_run_code_is_refused(tmp_path, world_manifest):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    import pickle

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "hyper_parameters": {"recipe": Payload()}}, f, protocol=2)  # torch.save's protocol
    for call in (lambda: load_stage(path),
                 lambda: fit(tiny_recipe("instruct", world_manifest, tmp_path / "r", f"trainer.resume_from={path}"))):
        with pytest.raises(PandoraError, match=r"evil.ckpt' holds Python objects besides tensors.*\(exec\).*could run code"):
            call()
    assert not marker.exists()


def test_config_only_folders_need_model_weights_random(tmp_path, fp16_folders):
    llm = tmp_path / "llm"
    llm.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fp16_folders["llm"] / name, llm / name)
    overrides = [f"model.llm.pretrained={llm}", f"model.vision.pretrained={fp16_folders['vision']}",
                 "trainer.precision=32-true"]  # the context below runs outside a Trainer (no autocast)
    with pytest.raises(PandoraError, match=r"llm: '.*llm' holds a config but no weights.*model.weights=random"):
        STAGES["align"].from_recipe(load_recipe(RECIPES / "tiny/align.yaml", overrides), ["move"])
    shutil.copy(fp16_folders["vision"] / "config.json", tmp_path / "config.json")  # vision: config only too
    module = STAGES["align"].from_recipe(
        load_recipe(RECIPES / "tiny/align.yaml", [*overrides, f"model.vision.pretrained={tmp_path}", "model.weights=random",
                                                 "trainable=[input_adapter.*]"]), ["move"])
    assert module.model.pretrained_modules() == {}, "random weights: nothing comes from a folder"
    assert module.model.llm.model.config.hidden_size == 32
    out = module.model.context(torch.zeros(1, 2, 3, 32, 32), ["move left"])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "slot, other, message",
    [
        ("llm", "vision", r"llm: '.*vision' holds a 'clip_vision_model' model \(CLIPVisionModel\); expected a causal language model"),
        ("vision", "llm", r"vision: '.*llm' holds a 'llama' model; expected a CLIP or SigLIP"),
        ("text_encoder", "llm", r"text_encoder: '.*llm' holds a 'llama' model; expected a CLIP text model"),
    ],
)
def test_a_folder_of_the_wrong_architecture_is_named(fp16_folders, slot, other, message):
    overrides = [f"model.{slot}.pretrained={fp16_folders[other]}", "model.text_encoder.enabled=true"]
    with pytest.raises(PandoraError, match=message):
        STAGES["align"].from_recipe(load_recipe(RECIPES / "tiny/align.yaml", overrides), ["move"])


def test_unknown_precision_is_a_recipe_error():
    with pytest.raises(PandoraError, match="precision 'bf16-mix' is unknown"):
        load_recipe(RECIPES / "tiny/align.yaml", ["trainer.precision=bf16-mix"])
