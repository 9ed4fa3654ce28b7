"""The adapt stage: only the adapter trains on a base checkpoint, the result is a peft folder that
loads back onto the base, and a LoRA run resumes exactly."""
from pathlib import Path

import json

import numpy as np
import pytest
import torch

from pandora_lightning.data.dataset import iterate_split
from pandora_lightning.data.manifest import write_manifest
from pandora_lightning.errors import PandoraError
from pandora_lightning.training.adapt import merged_base
from pandora_lightning.training.adapters import attach_adapters, read_adapter
from pandora_lightning.training.checkpoint import load_checkpoint_file, load_stage
from pandora_lightning.training.fit import fit
from pandora_lightning.training.lora import use_adapter
from pandora_lightning.world import WorldConfig
from pandora_lightning.world.domains import TRANSFER_DOMAIN, TRANSFER_HELD_OUT
from pandora_lightning.world.shards import ADAPT_REPLAY, write_world, write_world_shards
from tests.conftest import tiny_recipe
from tests.pretrained_folders import folder_overrides

GOLDEN_DIR = Path(__file__).parent / "golden"

# The test world's manifest has no adapt split; any split of shards can be a new domain's data.
ADAPT = ["data.split=train", "lora.name=desert"]


def adapt_recipe(manifest, run_dir, base, *overrides):
    return tiny_recipe("adapt", manifest, run_dir, f"init_from={base}", *ADAPT, *overrides)


@pytest.fixture(scope="module")
def adapted(world_manifest, align_checkpoint, tmp_path_factory):
    # A large step, so that two steps move the adapter visibly.
    run_dir = tmp_path_factory.mktemp("adapt") / "desert"
    return fit(adapt_recipe(world_manifest, run_dir, align_checkpoint, "optim.lr=0.05", "optim.warmup_steps=1"))


def test_adapt_trains_only_the_adapter_and_writes_a_peft_folder(adapted, align_checkpoint):
    run_dir = adapted.parents[1]
    assert (run_dir / "trainable.txt").read_text().split() == (GOLDEN_DIR / "trainable_adapt.txt").read_text().split()
    meta = read_adapter(run_dir / "adapter")
    assert meta["name"] == "desert" and sorted(meta["components"]) == ["generator", "llm"]
    assert meta["base_checkpoint"] == str(align_checkpoint)
    for component in ("llm", "generator"):  # the adapter alone: a whole tiny checkpoint is 17 MB
        assert (run_dir / "adapter" / component / "adapter_model.safetensors").stat().st_size < 300_000
    # Every base weight is the base checkpoint's; the adapter moved.
    base, tuned = load_stage(align_checkpoint).model, load_stage(adapted).model
    own = dict(tuned.named_parameters())
    for name, param in base.named_parameters():
        head, _, leaf = name.rpartition(".")
        torch.testing.assert_close(own.get(name, own.get(f"{head}.base_layer.{leaf}")), param, rtol=0, atol=0)
    assert any(p.abs().max() > 0 for n, p in own.items() if "lora_B.desert" in n)


def test_adapter_on_the_base_gives_the_adapted_model(adapted, align_checkpoint):
    tuned = load_stage(adapted).model
    module = load_stage(align_checkpoint)
    assert attach_adapters(module, align_checkpoint, [str(adapted.parents[1] / "adapter")]) == ["desert"]
    torch.manual_seed(0)
    given = torch.rand(2, 2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        use_adapter(module.model, "desert")
        with_adapter = module.model.context(given, ["move left", "grow"])
        torch.testing.assert_close(with_adapter, tuned.context(given, ["move left", "grow"]))
        use_adapter(module.model, None)
        assert (module.model.context(given, ["move left", "grow"]) - with_adapter).abs().max() > 1e-4


def test_adapter_is_found_by_name_beside_the_base_run(adapted, tmp_path):
    runs = tmp_path / "runs" / "tiny"
    (runs / "adapt").mkdir(parents=True)
    (runs / "adapt" / "desert").symlink_to(adapted.parents[1], target_is_directory=True)
    base = runs / "instruct" / "checkpoints" / "final.safetensors"

    class Stage:
        stage, model = "adapt", load_stage(adapted).model

    with pytest.raises(PandoraError, match=r"--adapter 'robot' is neither .* \(known there: desert\)"):
        attach_adapters(Stage(), base, ["robot"])
    assert attach_adapters(Stage(), base, ["again=desert"]) == ["again"]


def test_adapt_resumes_exactly(world_manifest, align_checkpoint, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # both runs on one thread: bit for bit
    try:
        common = ["data.epoch_samples=6", "trainer.checkpoint_every_n_steps=2"]
        straight = fit(adapt_recipe(world_manifest, tmp_path / "straight", align_checkpoint, "trainer.max_steps=4", *common))
        fit(adapt_recipe(world_manifest, tmp_path / "stopped", align_checkpoint, "trainer.max_steps=2", *common))
        resumed = fit(adapt_recipe(world_manifest, tmp_path / "stopped", align_checkpoint, "trainer.max_steps=4",
                                   "trainer.resume_from=last", *common))
    finally:
        torch.set_num_threads(threads)
    a, b = load_checkpoint_file(straight)["state_dict"], load_checkpoint_file(resumed)["state_dict"]
    lora = [k for k in a if "lora_" in k]
    assert lora and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_adapt_refuses_what_it_cannot_do(world_manifest, align_checkpoint, adapted, tmp_path):
    with pytest.raises(PandoraError, match=r"trains the adapter 'desert' only, but `trainable` also selects \['generator"):
        fit(adapt_recipe(world_manifest, tmp_path / "a", align_checkpoint, "trainable=[generator.unet.conv_in.*,'*lora_*']"))
    with pytest.raises(PandoraError, match="is an adapt checkpoint"):
        fit(adapt_recipe(world_manifest, tmp_path / "b", adapted))
    with pytest.raises(PandoraError, match=r"model differs from its base checkpoint's: model.generator.frames=8 \(the base has 6\)"):
        fit(adapt_recipe(world_manifest, tmp_path / "c", align_checkpoint, "model.generator.frames=8"))
    with pytest.raises(PandoraError, match="set init_from"):
        tiny_recipe("adapt", world_manifest, tmp_path / "d", "init_from=null")


def test_world_adapt_split_is_the_transfer_domain_with_every_action(tmp_path):
    cfg = WorldConfig()
    records = write_world_shards(tmp_path, cfg, {"adapt": 24, "transfer": 24}, samples_per_shard=64)
    assert [(r["split"], r["domain"]) for r in records] == [("transfer", TRANSFER_DOMAIN), ("adapt", TRANSFER_DOMAIN)]
    manifest = write_manifest(tmp_path / "m.yaml", "world", tmp_path, records)
    adapt = list(iterate_split(manifest, "adapt"))
    transfer = list(iterate_split(manifest, "transfer"))
    actions = {a["action"] for _, _, meta in adapt for a in meta["actions"]}
    assert set(TRANSFER_HELD_OUT) <= actions and len(actions) > len(TRANSFER_HELD_OUT)
    # None of the transfer test's start states is an adaptation start state.
    starts = {frames[0].tobytes() for _, frames, _ in adapt}
    assert not any(frames[0].tobytes() in starts for _, frames, _ in transfer)
    assert len(starts) == len(adapt) and all(np.asarray(f).ndim == 4 for _, f, _ in adapt)


def test_generate_play_and_compare_with_an_adapter(adapted, align_checkpoint, world_manifest, tmp_path, capsys, monkeypatch):
    import io

    from PIL import Image

    from pandora_lightning.cli import main

    adapter = adapted.parents[1] / "adapter"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "start.png")
    common = ["--image", str(tmp_path / "start.png"), "--actions", "move left"]
    assert main(["generate", str(align_checkpoint), *common, "--out", str(tmp_path / "base")]) == 0
    assert main(["generate", str(align_checkpoint), *common, "--adapter", str(adapter), "--out", str(tmp_path / "on")]) == 0
    assert main(["generate", str(adapted), *common, "--out", str(tmp_path / "own")]) == 0
    sheets = {k: np.asarray(Image.open(tmp_path / k / "rollout.png")).astype(int) for k in ("base", "on", "own")}
    assert np.abs(sheets["on"] - sheets["own"]).max() <= 1, "base + adapter folder renders what the adapt checkpoint renders"
    assert np.abs(sheets["on"] - sheets["base"]).max() > 1
    # play takes the adapter the same way: its terminal mode renders what generate rendered
    monkeypatch.setattr("sys.stdin", io.StringIO("move left\n:save\n:quit\n"))
    assert main(["play", str(align_checkpoint), "--terminal", "--no-color", "--image", str(tmp_path / "start.png"),
                 "--adapter", str(adapter), "--out", str(tmp_path / "play")]) == 0
    played = np.asarray(Image.open(tmp_path / "play" / "rollout.png")).astype(int)
    assert np.abs(played - sheets["on"]).max() <= 1

    out = tmp_path / "compare"
    assert main(["score", "--compare", str(align_checkpoint), str(adapter), f"again={adapter}",
                 f"manifest={world_manifest}", "per_domain=1", "batch_size=8", f"out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "| metric | split | domain | base | desert | Δ desert | again | Δ again |" in printed
    assert "| action following (strict) ↑ | transfer | desert |" in printed and "| action following (strict) ↑ | val | meadow |" in printed
    assert "(chance " in printed
    assert (out / "compare.png").stat().st_size > 0 and (out / "compare.md").read_text() in printed
    result = json.loads((out / "compare.json").read_text())
    row = next(r for r in result["rows"] if r["metric"] == "psnr" and r["split"] == "val" and r["domain"] == "all")
    assert row["values"]["desert"] == row["values"]["again"] != row["values"]["base"]
    # in bf16 (what the demo's checkpoint trains in): the frozen parts in bf16 under its autocast, as `score` runs
    bf16 = tmp_path / "compare-bf16"
    assert main(["score", "--compare", str(align_checkpoint), str(adapter), f"manifest={world_manifest}", "per_domain=1",
                 "batch_size=8", f"out={bf16}", "precision=bf16-mixed"]) == 0
    again = next(r for r in json.loads((bf16 / "compare.json").read_text())["rows"]
                 if r["metric"] == "psnr" and r["split"] == "val" and r["domain"] == "all")
    # bf16 compute: not the fp32 numbers (the precision was honoured), but the same picture within rounding
    assert all(0 < abs(again["values"][k] - row["values"][k]) < 1.0 for k in ("base", "desert")), (again, row)

    assert main(["score", "--compare", str(align_checkpoint), f"manifest={world_manifest}"]) == 2
    assert "takes the base checkpoint, then one or more adapters" in capsys.readouterr().err
    assert main(["generate", str(align_checkpoint), *common, "--adapter", "nowhere"]) == 2
    assert "--adapter 'nowhere' is neither an adapter folder nor the name of an adapt run" in capsys.readouterr().err


def test_world_manifest_mixes_a_little_replay_into_the_adapt_split(tmp_path):
    manifest = write_world(tmp_path / "shards", tmp_path / "world.yaml", WorldConfig(), {"train": 4, "adapt": 6}, 64)
    adapt = {s.domain: s for s in manifest.sets if s.split == "adapt"}
    train = {s.domain: s for s in manifest.sets if s.split == "train"}
    assert adapt[TRANSFER_DOMAIN].shards == ["adapt-desert-000000.tar"]
    assert sorted(adapt) == sorted(train) and all(adapt[d].shards == train[d].shards for d in adapt if d != TRANSFER_DOMAIN)
    assert adapt[TRANSFER_DOMAIN].weight == pytest.approx(6 / (6 + 3 * ADAPT_REPLAY))


def test_adapt_checkpoint_on_a_pretrained_llm_keeps_the_base_lora(fp16_instruct, world_manifest, tmp_path):
    """The base's LLM LoRA is merged into weights that the LLM folder provides, which no checkpoint
    holds: reloading the adapt checkpoint must rebuild that base, not the folder's plain LLM."""
    base_ckpt, folders = fp16_instruct
    adapted_ckpt = fit(adapt_recipe(world_manifest, tmp_path / "desert", base_ckpt, *folder_overrides(folders)))
    given = torch.rand(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        base = merged_base(base_ckpt).model.context(given, ["move left", "grow"])
        plain = load_stage(base_ckpt).model
        use_adapter(plain, None)  # the folders without the base's LoRA
        assert (plain.context(given, ["move left", "grow"]) - base).abs().max() > 1e-3, "the base's LoRA matters"
        reloaded = load_stage(adapted_ckpt).model
        use_adapter(reloaded, None)
        torch.testing.assert_close(reloaded.context(given, ["move left", "grow"]), base, rtol=0, atol=1e-5)
    # The base's trained UNet layer, which the generator folder also provides, comes back too.
    trained = load_stage(base_ckpt).model.generator.unet.conv_in.weight
    torch.testing.assert_close(reloaded.generator.unet.conv_in.weight, trained, rtol=0, atol=0)
    moved = base_ckpt.with_name("moved.safetensors")
    base_ckpt.rename(moved)
    try:
        with pytest.raises(PandoraError, match=r"adapter 'desert': its base checkpoint '.*final.safetensors' does not exist"):
            load_stage(adapted_ckpt)
    finally:
        moved.rename(base_ckpt)


def test_export_with_an_adapter_as_peft_folders_or_merged(adapted, align_checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pandora_lightning.training.export import export_checkpoint

    adapter = adapted.parents[1] / "adapter"
    ids = torch.tensor([[3, 5, 7, 9]])
    tuned = load_stage(adapted).model.llm.model  # the adapt checkpoint: its adapter running
    with torch.no_grad():
        want = tuned(input_ids=ids).logits
        out = export_checkpoint(align_checkpoint, tmp_path / "peft", [str(adapter)])
        assert json.loads((out / "export.json").read_text())["adapters"] == {
            "desert": {"llm": "lora/desert/llm", "generator": "lora/desert/generator"}}
        llm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "llm"), str(out / "lora/desert/llm"))
        torch.testing.assert_close(llm.eval()(input_ids=ids).logits, want, rtol=0, atol=1e-5)
        merged = export_checkpoint(adapted, tmp_path / "merged", merge=True)
        folded = AutoModelForCausalLM.from_pretrained(merged / "llm").eval()
        torch.testing.assert_close(folded(input_ids=ids).logits, want, rtol=0, atol=1e-5)
    with pytest.raises(PandoraError, match=r"--merge folds one adapter into the weights, but the model holds 2 \(again, desert\)"):
        export_checkpoint(align_checkpoint, tmp_path / "two", [str(adapter), f"again={adapter}"], merge=True)
