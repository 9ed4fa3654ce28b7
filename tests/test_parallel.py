"""Scale-out on CPU (gloo), with ranks launched from outside as SLURM/torchrun launch them:
FSDP2 gives DDP's losses, resumes exactly from its sharded checkpoint after a requeue signal, and its
consolidated checkpoint scores."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pandora_lightning.errors import PandoraError
from pandora_lightning.recipe import load_recipe
from pandora_lightning.training.parallel import ParallelConfig, apply_activation_checkpointing, blocks_of, check_machine
from pandora_lightning.training.checkpoint import load_checkpoint_file
from pandora_lightning.training.fit import fit
from pandora_lightning.training.sharded import is_sharded, read_sharded
from pandora_lightning.training.stage import STAGES
from tests.conftest import RECIPES
from tests.dist_fit import launch, steps

RECIPE = str(RECIPES / "tiny" / "instruct.yaml")


def overrides(manifest, run_dir, strategy: str, *extra: str) -> list[str]:
    # 3 steps an epoch on each of 2 ranks: 5 steps cross an epoch boundary.
    return [f"data.manifest={manifest}", f"run_dir={run_dir}", "data.batch_size=2", "data.num_workers=0",
            "data.shuffle_buffer=4", "data.epoch_samples=12", "trainer.max_steps=5", "trainer.log_every_n_steps=1",
            "trainer.progress_bar=false", "trainer.logger=none", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.checkpoint_every_n_steps=5", "model.generator.num_inference_steps=2", "init_from=null",
            f"parallel.strategy={strategy}", "trainer.precision=32-true", *extra]  # fp32: losses compared exactly


@pytest.fixture(scope="module")
def runs(world_manifest, tmp_path_factory):
    """2-process fits: ddp 5 steps; fsdp2 5 steps; fsdp2 signalled (SIGUSR1) after step 2, then restarted."""
    root = tmp_path_factory.mktemp("parallel")
    out = {name: root / name for name in ("ddp", "fsdp2", "requeued")}
    launch(2, out["ddp"], RECIPE, *overrides(world_manifest, out["ddp"] / "run", "ddp"))
    launch(2, out["fsdp2"], RECIPE, *overrides(world_manifest, out["fsdp2"] / "run", "fsdp2"))
    launch(2, out["requeued"], RECIPE, *overrides(world_manifest, out["requeued"] / "run", "fsdp2"), signal_at=2)
    out["stopped_steps"] = [steps(out["requeued"], r) for r in (0, 1)]
    out["final_after_stop"] = (out["requeued"] / "run" / "checkpoints" / "final.safetensors").exists()
    launch(2, out["requeued"], RECIPE,
           *overrides(world_manifest, out["requeued"] / "run", "fsdp2", "trainer.resume_from=last"))
    return out


def test_fit_tears_the_process_group_down(runs):
    """Left to interpreter exit, gloo's threads can abort a rank (SIGABRT) after its run: a bare 2-rank gloo
    script did so in 11 of 30 runs on this machine, none of 30 with destroy_process_group."""
    for name in ("ddp", "fsdp2"):
        for rank in (0, 1):
            assert json.loads((runs[name] / f"ended-{rank}.json").read_text()) == {"group_left": False}


def test_fsdp2_gives_the_ddp_losses(runs):
    for rank in (0, 1):
        ddp, fsdp = steps(runs["ddp"], rank), steps(runs["fsdp2"], rank)
        assert [s["step"] for s in fsdp] == [1, 2, 3, 4, 5]
        assert [s["keys"] for s in ddp] == [s["keys"] for s in fsdp]
        for a, b in zip(ddp, fsdp):
            assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (rank, a, b)


def test_sharded_checkpoint_holds_what_trained(runs):
    checkpoints = runs["fsdp2"] / "run" / "checkpoints"
    folder = checkpoints / "last.ckpt"
    assert is_sharded(folder)
    assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    ckpt = read_sharded(folder)
    assert ckpt["global_step"] == 5 and ckpt["hyper_parameters"]["stage"] == "instruct"
    names = set((runs["fsdp2"] / "run" / "trainable.txt").read_text().split())
    stored = {k.removeprefix("model.") for k in ckpt["state_dict"]}
    assert names <= stored, "every trainable tensor is in the checkpoint"
    # the loader position of both ranks travels in meta.pt
    loader = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader["world_size"] == 2 and loader["position"] == 5 and len(loader["ranks"]) == 2
    # the model file is gathered from the shards: the same tensors as the sharded folder
    final = load_checkpoint_file(checkpoints / "final.safetensors")["state_dict"]
    assert final.keys() == ckpt["state_dict"].keys()
    assert all(torch.equal(final[k], ckpt["state_dict"][k]) for k in final)


def test_requeue_signal_checkpoints_and_the_restart_continues_exactly(runs):
    stopped = runs["stopped_steps"]
    assert [s["step"] for s in stopped[0]] == [1, 2] and [s["step"] for s in stopped[1]] == [1, 2], \
        "SIGUSR1 on rank 0 after step 2 stops both ranks at that step boundary"
    assert not runs["final_after_stop"], "a run stopped for a requeue writes no final model file"
    for rank in (0, 1):
        straight, requeued = steps(runs["fsdp2"], rank), steps(runs["requeued"], rank)
        assert [s["step"] for s in requeued] == [1, 2, 3, 4, 5]
        assert requeued == straight, f"rank {rank}: same batches and bit-identical losses after the restart"
    a = load_checkpoint_file(runs["fsdp2"] / "run" / "checkpoints" / "final.safetensors")["state_dict"]
    b = load_checkpoint_file(runs["requeued"] / "run" / "checkpoints" / "final.safetensors")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final weights bit for bit"


def test_a_checkpoint_of_the_other_form_is_refused(runs):
    run = runs["fsdp2"] / "run"
    recipe = load_recipe(RECIPE, overrides("none.yaml", run, "auto", "trainer.devices=1", "trainer.resume_from=last"))
    with pytest.raises(PandoraError, match="is a sharded .* checkpoint folder; resume it with parallel.strategy=fsdp2"):
        fit(recipe)
    recipe = load_recipe(RECIPE, overrides("none.yaml", run, "fsdp2", f"trainer.resume_from={run}/checkpoints/final.safetensors"))
    with pytest.raises(PandoraError, match="is a single-file checkpoint, but parallel.strategy=fsdp2 resumes from"):
        fit(recipe)


def test_fsdp2_needs_two_processes():
    with pytest.raises(PandoraError, match="parallel.strategy=fsdp2 shards over processes"):
        check_machine(ParallelConfig(strategy="fsdp2"), devices=1, num_nodes=1)


def test_cpu_offload_refused_without_host_memory(monkeypatch):
    import pandora_lightning.training.parallel as parallel

    monkeypatch.setattr(parallel, "host_memory_bytes", lambda: 8 * 2**30)
    with pytest.raises(PandoraError, match="cpu_offload=true needs about"):
        check_machine(ParallelConfig(strategy="fsdp2", cpu_offload=True), 8, 1, trainable=2 * 10**9, frozen=7 * 10**9)


def test_parallel_block_is_checked(tmp_path):
    with pytest.raises(PandoraError, match="activation_checkpointing names \\['unet'\\]"):
        load_recipe(RECIPE, ["parallel.activation_checkpointing=[unet]"])
    with pytest.raises(PandoraError, match="set parallel.strategy=fsdp2"):
        load_recipe(RECIPE, ["parallel.cpu_offload=true"])


def test_activation_checkpointing_recomputes_the_same_gradients(world_manifest):
    recipe = load_recipe(RECIPE, ["init_from=null", "loss.text_dropout=0", f"data.manifest={world_manifest}", "trainer.precision=32-true"])
    torch.manual_seed(0)
    plain = STAGES["instruct"].from_recipe(recipe)
    torch.manual_seed(0)
    ckpt = STAGES["instruct"].from_recipe(recipe)
    switched = apply_activation_checkpointing(ckpt.model, ["llm", "output_adapter", "generator"])
    assert any(s.startswith("generator.unet") for s in switched) and any(s.startswith("llm") for s in switched)
    assert blocks_of(ckpt.model.llm) and blocks_of(ckpt.model.generator.unet)
    batch = {"frames": torch.randint(0, 255, (2, 6, 3, 32, 32), dtype=torch.uint8), "text": ["move left", "grow"]}
    grads = []
    for stage in (plain, ckpt):
        stage.train()
        torch.manual_seed(1)
        stage.losses(batch)["loss"].backward()
        grads.append({n: p.grad for n, p in stage.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_consolidated_checkpoint_scores_like_the_folder(runs, world_manifest, tmp_path):
    from pandora_lightning.evaluation.config import ScoreConfig
    from pandora_lightning.evaluation.score import run_score
    from pandora_lightning.training.checkpoint import load_stage
    from pandora_lightning.training.sharded import consolidate

    folder = runs["fsdp2"] / "run" / "checkpoints" / "last.ckpt"
    single = consolidate(folder, tmp_path / "last.safetensors")
    a, b = load_stage(folder).state_dict(), load_stage(single).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = dict(manifest=str(world_manifest), splits=["val"], per_domain=1, batch_size=4, num_inference_steps=1)
    scores = [run_score(ScoreConfig(checkpoint=str(c), out=str(tmp_path / n), **cfg))["splits"]["val"]["metrics"]
              for c, n in ((folder, "a"), (single, "b"))]
    assert scores[0] == scores[1] and scores[0]["psnr"]["overall"] > 0
