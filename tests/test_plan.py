"""`plan`: parameter counts, activations measured on the meta device, the smallest setting that fits."""
from __future__ import annotations

import torch

from pandora_lightning.cli import main
from pandora_lightning.recipe import load_recipe
from pandora_lightning.training import plan
from tests.conftest import RECIPES

RECIPE = RECIPES / "tiny" / "instruct.yaml"


def test_meta_activations_match_a_real_cpu_step(world_manifest):
    """The meta-device measurement equals the same tracker on real tensors within 10%."""
    recipe = load_recipe(RECIPE, ["init_from=null", "loss.text_dropout=0", f"data.manifest={world_manifest}", "trainer.precision=32-true"])
    meta = plan.measure_activations(plan.build_on_meta(recipe), recipe, 4, [])
    torch.manual_seed(0)
    from pandora_lightning.training.stage import STAGES

    stage = STAGES["instruct"].from_recipe(recipe)
    stage.train()
    batch = plan.plan_batch(recipe, 4, device="cpu")
    real = plan.measure_step(stage, lambda: stage.losses(batch)["loss"], "cpu")
    assert 0.9 < meta / real < 1.1, (meta, real)
    ckpt = plan.measure_activations(plan.build_on_meta(recipe), recipe, 4, ["llm", "output_adapter", "generator"])
    assert ckpt < 0.8 * meta, "activation checkpointing stores less"


def test_plan_table_and_the_smallest_setting_that_fits(world_manifest, capsys):
    recipe = load_recipe(RECIPE, ["init_from=null", f"data.manifest={world_manifest}"])
    big = plan.make_plan(recipe, gpus=2, gpu_memory_gib=80)
    names = [s.name for s, _ in big["rows"]]
    assert names[0] == "ddp" and "fsdp2 + act. ckpt + precomputed + cpu offload" in names
    assert big["best"][0].name == "ddp", "with room to spare the simplest setting is chosen"
    rows = {s.name: m for s, m in big["rows"]}
    assert rows["fsdp2"]["static"] < rows["ddp"]["static"], "sharding splits weights, gradients and optimizer state"
    assert rows["ddp + act. ckpt"]["activations"] < rows["ddp"]["activations"]
    counts = big["counts"]
    assert counts.total_trainable + counts.total_frozen == sum(p.numel() for p in plan.build_on_meta(recipe).parameters())
    # A GPU that holds only the cheapest setting: that one is chosen.
    cheapest = min(m["total"] for _, m in big["rows"])
    small = plan.choose(big["rows"], cheapest / plan.GiB / 0.9 * 1.001)
    assert small["best"][1]["total"] == cheapest and small["best"][0].name != "ddp"
    assert main(["plan", str(RECIPE), "init_from=null", f"data.manifest={world_manifest}", "--gpus", "2",
                 "--gpu-memory", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "generator.unet" in out and "nothing fits" in out
