"""Shared fixtures: a small world written to a temporary folder and a tiny align checkpoint."""
from __future__ import annotations

import os
from pathlib import Path

# The tests run tiny models whose ops are too small to split across threads: one thread per process
# avoids oversubscribing the cores (the two-rank tests start more processes), about 3x faster on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from pandora_lightning.recipe import load_recipe
from pandora_lightning.data.manifest import write_manifest
from pandora_lightning.world.shards import write_world_shards
from pandora_lightning.training.fit import fit
from pandora_lightning.world import WorldConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def world_manifest(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    records = write_world_shards(out / "shards", WorldConfig(), {"train": 8, "val": 2, "transfer": 2}, samples_per_shard=4)
    return Path(write_manifest(out / "world.yaml", "world", out / "shards", records).path)


def tiny_recipe(stage: str, manifest: Path, run_dir: Path, *overrides: str):
    """The shipped tiny recipe, shrunk to a couple of CPU steps on the test world."""
    return load_recipe(
        RECIPES / "tiny" / f"{stage}.yaml",
        [
            f"data.manifest={manifest}",
            f"run_dir={run_dir}",
            "data.batch_size=2",
            "data.num_workers=0",
            "data.shuffle_buffer=4",
            "trainer.max_steps=2",
            "trainer.log_every_n_steps=1",
            "trainer.progress_bar=false",
            "model.generator.num_inference_steps=2",
            # fp32: tests compare runs exactly and step modules outside a Trainer (without its autocast);
            # the bf16 paths have their own tests
            "trainer.precision=32-true",
            *overrides,
        ],
    )


@pytest.fixture(scope="session")
def align_checkpoint(world_manifest, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "align"
    return fit(tiny_recipe("align", world_manifest, run_dir))


@pytest.fixture(scope="session")
def fp16_instruct(world_manifest, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """An instruct checkpoint on tiny fp16 folders (Llama, CLIP vision, CLIP text, the svd generator) with
    LoRA on the LLM and the UNet and the UNet's conv_in trained; a large step moves every LoRA far
    enough to matter. Returns (checkpoint, folders)."""
    import torch

    from tests.pretrained_folders import folder_overrides, save_folders

    root = tmp_path_factory.mktemp("fp16-instruct")
    folders = save_folders(root / "folders", torch.float16)
    final = fit(tiny_recipe(
        "instruct", world_manifest, root / "run", *folder_overrides(folders), "init_from=null", "lora.llm.rank=4",
        "lora.generator.rank=4", "optim.lr=0.05", "optim.warmup_steps=1",
        "trainable=[input_adapter.*,llm.query_tokens,output_adapter.*,'*lora_*',generator.unet.conv_in.*]",
    ))
    return final, folders
