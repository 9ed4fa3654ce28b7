"""Meta-device start-up under fsdp2 (parallel.meta_init): the pretrained components are built on the
meta device, each rank reads only its shard of every weight from the folders' safetensors, and the
model equals the one a full CPU build gives, random parts included (same seed)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pandora_lightning.errors import PandoraError
from pandora_lightning.recipe import load_recipe
from pandora_lightning.training.checkpoint import init_from
from pandora_lightning.training.stage import STAGES
from tests.conftest import RECIPES
from tests.dist_fit import launch, steps
from tests.pretrained_folders import folder_overrides

RECIPE = RECIPES / "tiny" / "instruct.yaml"
LORA = ["lora.llm.rank=4", "lora.generator.rank=4",
        "trainable=[input_adapter.*,llm.query_tokens,output_adapter.*,'*lora_*',generator.unet.conv_in.*]"]
VOCABULARY = ["move", "left", "grow", "the", "object"]


def build(folders, lazy: bool, *extra: str, start=None):
    """The instruct stage on the fp16 folders with LoRA on the LLM and UNet, seeded as `fit` seeds it."""
    recipe = load_recipe(RECIPE, [*folder_overrides(folders), "init_from=null", "data.manifest=none.yaml", *LORA, *extra])
    torch.manual_seed(recipe.seed)
    stage = STAGES["instruct"].from_recipe(recipe, VOCABULARY, lazy=lazy)
    if start is not None:
        init_from(stage, start)
    return stage


@pytest.mark.parametrize("precision,start", [("32-true", "final.safetensors"), ("bf16-mixed", "last.ckpt")])
def test_lazy_build_equals_the_full_build(fp16_instruct, precision, start):
    """Weights from the folders, random parts (adapters, queries, LoRA A), the init_from file's tensors (a
    model file read lazily, or a resume file) and non-persistent buffers (rotary frequencies, position ids)."""
    final, folders = fp16_instruct
    start = final if start == "final.safetensors" else final.parent / start
    eager = build(folders, False, f"trainer.precision={precision}", start=start)
    lazy = build(folders, True, f"trainer.precision={precision}", start=start)
    assert any(p.is_meta for p in lazy.model.llm.parameters()) and not any(p.is_meta for n, p in lazy.named_parameters() if "lora_" in n)
    lazy.lazy_weights.check(lazy.model)
    lazy.lazy_weights.take_snapshot(lazy.model)
    filled = lazy.lazy_weights.materialize(lazy.model, torch.device("cpu"))
    assert min(filled.values()) > 0, filled  # every source took part
    a, b = eager.model.state_dict(), lazy.model.state_dict()
    assert a.keys() == b.keys()
    assert not [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    ba, bb = dict(eager.model.named_buffers()), dict(lazy.model.named_buffers())
    assert ba.keys() == bb.keys() and any("inv_freq" in k for k in ba) and any("position_ids" in k for k in ba)
    assert all(torch.equal(ba[k], bb[k]) for k in ba)


def test_lazy_wan_equals_the_full_build(tmp_path):
    """Wan's transformer draws random numbers in its constructor (diffusers' from_pretrained too) and loads some
    modules in float32 under bf16: what is built after it, and those modules trained, match the full build."""
    from tests.generator_folders import wan

    folder = wan(tmp_path / "wan")
    recipe = load_recipe(RECIPES / "tiny" / "align.yaml", [
        f"model.generator.pretrained={folder}", "model.generator.frames=5", "model.generator.cond_frames=1",
        "model.text_encoder.enabled=true", "init_from=null", "data.manifest=none.yaml", "trainer.precision=bf16-mixed",
        "trainable=[input_adapter.*,llm.query_tokens,output_adapter.*,generator.transformer.*]"])
    states = []
    for lazy in (False, True):
        torch.manual_seed(recipe.seed)
        stage = STAGES["align"].from_recipe(recipe, VOCABULARY, lazy=lazy)
        if lazy:
            stage.lazy_weights.take_snapshot(stage.model)
            stage.lazy_weights.materialize(stage.model, torch.device("cpu"))
        states.append(stage.model.state_dict())
    a, b = states
    assert a.keys() == b.keys() and not [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


def test_tied_weights_stay_tied(fp16_instruct, tmp_path):
    """A Llama whose lm_head is its embedding (the folder stores it once): tied in the lazy build as in the full one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pandora_lightning.models.tokenizer import build_word_tokenizer

    _, folders = fp16_instruct
    tokenizer = build_word_tokenizer(VOCABULARY)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
                     ).to(torch.float16).save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    stages = [build({**folders, "llm": tmp_path / "llm"}, lazy) for lazy in (False, True)]
    stages[1].lazy_weights.take_snapshot(stages[1].model)
    stages[1].lazy_weights.materialize(stages[1].model, torch.device("cpu"))
    a, b = (s.model.state_dict() for s in stages)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for stage in stages:
        llm = stage.model.llm.model
        assert llm.lm_head.weight is llm.model.embed_tokens.weight


def _rewrite(folder, change) -> None:
    """The folder's model.safetensors with `change(tensors)` applied."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_tensor_the_files_lack_or_misshape_is_one_line(fp16_instruct, tmp_path):
    _, folders = fp16_instruct
    llm = tmp_path / "llm"
    shutil.copytree(folders["llm"], llm)
    _rewrite(llm, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    stage = build({**folders, "llm": llm}, True)
    with pytest.raises(PandoraError, match=f"'{llm}' has no tensor 'model.layers.0.mlp.up_proj.weight' "
                                           f"\\(for llm.model.model.layers.0.mlp.up_proj.weight\\)") as err:
        stage.lazy_weights.check(stage.model)
    assert "\n" not in str(err.value)
    _rewrite(llm, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 32, dtype=torch.float16)}))
    stage = build({**folders, "llm": llm}, True)
    with pytest.raises(PandoraError, match="tensor 'model.layers.0.mlp.up_proj.weight' in .* is \\[3, 32\\], but "
                                           "llm.model.model.layers.0.mlp.up_proj.weight built from its config is \\[64, 32\\]"):
        stage.lazy_weights.check(stage.model)
    (llm / "model.safetensors").rename(llm / "pytorch_model.bin")
    with pytest.raises(PandoraError, match="holds no \\*.safetensors \\(pytorch_model.bin\\).*parallel.meta_init=false"):
        build({**folders, "llm": llm}, True)


@pytest.fixture(scope="module")
def runs(fp16_instruct, world_manifest, tmp_path_factory, monkeypatch_module):
    """2-process fsdp2 fits on the fp16 folders: every rank building the whole model (meta_init=false) and lazily."""
    _, folders = fp16_instruct
    root = tmp_path_factory.mktemp("lazy")
    monkeypatch_module.setenv("DUMP_START", "1")
    for name, meta in (("eager", "false"), ("lazy", "true")):
        launch(2, root / name, str(RECIPE), *folder_overrides(folders), *LORA, f"data.manifest={world_manifest}",
               f"run_dir={root / name / 'run'}", "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=4",
               "data.epoch_samples=12", "trainer.max_steps=2", "trainer.log_every_n_steps=1", "trainer.progress_bar=false",
               "trainer.logger=none", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.checkpoint_every_n_steps=5",
               "init_from=null", "parallel.strategy=fsdp2", f"parallel.meta_init={meta}")
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_lazy_fsdp2_starts_from_the_full_build_and_trains_alike(runs):
    a, b = load_file(runs / "eager" / "start.safetensors"), load_file(runs / "lazy" / "start.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the gathered state dicts at the start"
    for rank in (0, 1):
        starts = [json.loads((runs / name / f"start-{rank}.json").read_text()) for name in ("eager", "lazy")]
        assert starts[0]["buffers"] == starts[1]["buffers"]
        eager, lazy = steps(runs / "eager", rank), steps(runs / "lazy", rank)
        assert [s["step"] for s in lazy] == [1, 2] and [s["keys"] for s in eager] == [s["keys"] for s in lazy]
        assert all(math.isclose(x["loss"], y["loss"], rel_tol=1e-5) for x, y in zip(eager, lazy)), (eager, lazy)


def test_each_rank_reads_only_its_shard(runs):
    reads = [json.loads((runs / "lazy" / f"start-{rank}.json").read_text())["read"] for rank in (0, 1)]
    keys = set(reads[0]) | set(reads[1])
    sizes = {}
    for key in keys:
        folder, name = key.split("::")
        files = sorted(Path(folder).glob("*.safetensors"))
        with safe_open(str(files[0]), framework="pt") as f:
            sizes[key] = math.prod(f.get_slice(name).get_shape())
    # every element of every weight is read once, by one of the two ranks
    assert all(reads[0].get(k, 0) + reads[1].get(k, 0) == sizes[k] for k in keys)
    assert any(reads[0].get(k, 0) != reads[1].get(k, 0) for k in keys), "uneven first dimensions occur (chunk padding)"
    total = sum(sizes.values())
    assert total > 10**6
    for rank in (0, 1):
        assert 0.45 < sum(reads[rank].values()) / total < 0.55, (rank, sum(reads[rank].values()), total)
