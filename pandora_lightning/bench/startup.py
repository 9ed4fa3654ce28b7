"""`pandora-lightning bench --only startup`: host memory of an fsdp2 start-up, every rank building the whole
model (parallel.meta_init=false) against each rank reading only its shards (meta_init=true, the default).

The model: the tiny instruct recipe around a random Llama of ~220 M parameters written as a release is
(save_pretrained: config.json, model.safetensors in bf16, a tokenizer). Two CPU processes (gloo)
each build the stage and run its `configure_model` (fully_shard, and under meta_init the reading of
its shards), as `fit` does before the first step; each reports its peak resident memory (ru_maxrss,
file pages mapped from the safetensors included) and its resident memory after the imports.
"""
from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LLAMA = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16,
             max_position_embeddings=512)


def llama_folder(folder: Path, words: list[str]) -> Path:
    """A random Llama (LLAMA, the tokenizer's vocabulary) saved as a release is, in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pandora_lightning.models.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(words)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, pad_token_id=tokenizer.pad_token_id, **LLAMA)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _rss_mib(kind: str = "VmRSS") -> float:
    """Resident memory of this process from /proc/self/status: VmRSS (all), RssAnon (private), RssFile (mapped files)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(kind + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(folder: str, meta_init: str, out: str) -> None:
    """One rank: build the stage and configure it as `fit` does, then write its memory figures."""
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from pandora_lightning.recipe import load_recipe
    from pandora_lightning.training.parallel import configure
    from pandora_lightning.training.stage import STAGES

    after_imports = _rss_mib()
    dist.init_process_group("gloo")
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "instruct.yaml", [
        f"model.llm.pretrained={folder}", "init_from=null", "data.manifest=none.yaml", "trainer.devices=2",
        "parallel.strategy=fsdp2", f"parallel.meta_init={meta_init}"])
    torch.manual_seed(recipe.seed)
    start = time.perf_counter()
    stage = STAGES[recipe.stage].from_recipe(recipe, ["move", "left"], lazy=recipe.parallel.lazy)
    if stage.lazy_weights is not None:
        stage.lazy_weights.check(stage.model)
    stage._device_mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("data_parallel",))
    configure(stage, recipe.parallel, recipe.trainer.precision)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in stage.model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps({"rank": dist.get_rank(), "peak_rss_mib": round(peak), "rss_after_imports_mib": round(after_imports),
                                     "anon_after_mib": round(_rss_mib("RssAnon")), "seconds": round(seconds, 2), "parameters": params}))
    dist.destroy_process_group()


def _launch(folder: Path, meta_init: bool, root: Path, processes: int = 2) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(processes):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "pandora_lightning.bench.startup", str(folder), str(meta_init).lower(), str(root / f"{meta_init}-{rank}.json")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        log = p.communicate()[0]
        if p.returncode:
            raise RuntimeError(f"bench startup rank exited with {p.returncode}:\n{log[-3000:]}")
    return [json.loads((root / f"{meta_init}-{rank}.json").read_text()) for rank in range(processes)]


def run_startup_bench() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = llama_folder(root / "llm", ["move", "left"])
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        result = {"llm_file_mib": round(size / 2**20), "processes": 2, "eager": _launch(folder, False, root), "lazy": _launch(folder, True, root)}
    print("\n=== bench: fsdp2 start-up on 2 CPU processes, a random Llama of %d M parameters (%d MiB bf16 safetensors) ==="
          % (result["lazy"][0]["parameters"] / 1e6, result["llm_file_mib"]))
    print(f"{'':>22} {'rank':>5} {'peak RSS MiB':>13} {'after imports':>14} {'private after':>14} {'build+configure s':>18}")
    for name, label in (("eager", "whole model per rank"), ("lazy", "own shards (meta)")):
        for r in result[name]:
            print(f"{label:>22} {r['rank']:>5} {r['peak_rss_mib']:>13} {r['rss_after_imports_mib']:>14} {r['anon_after_mib']:>14} "
                  f"{r['seconds']:>18}")
    print("(peak RSS counts the safetensors pages each rank maps; 'private after': its own memory once configured)")
    return result


if __name__ == "__main__":
    worker(*sys.argv[1:4])
