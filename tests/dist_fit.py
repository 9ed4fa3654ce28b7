"""Test driver: one rank of a multi-process `fit`, launched the way SLURM or torchrun launch ranks
(each process started from outside with its rank in the environment, see `launch`).

    python -m tests.dist_fit OUT RECIPE [key=value ...]

Each rank appends {"step", "loss", "keys"} per step to OUT/steps-<rank>.jsonl. With SIGNAL_AT_STEP=k
in the environment, rank 0 sends itself SIGUSR1 after step k (the signal SLURM sends before the
time limit) - only rank 0, as a real signal reaches the ranks at slightly different moments.
With DUMP_START=1, at the start of fit rank 0 writes the model's full state dict (gathered from the
shards) to OUT/start.safetensors, and each rank writes OUT/start-<rank>.json: its buffers' sums and
the elements it read from pretrained folders (models.weight_files) and the local sizes of its shards.
After fit each rank writes OUT/ended-<rank>.json: whether its process group was still up.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]


class StepLog(L.Callback):
    def __init__(self, out: Path, signal_at: int):
        self.out, self.signal_at = out, signal_at

    def on_fit_start(self, trainer, pl_module):
        if os.environ.get("DUMP_START") != "1":
            return
        from safetensors.torch import save_file
        from torch.distributed.tensor import DTensor

        from pandora_lightning.models.weight_files import ELEMENTS_READ
        from pandora_lightning.training.parallel import full_state_dict

        model = pl_module.model
        state = full_state_dict(model)
        if state is None:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if trainer.global_rank == 0:
            save_file({k: v.contiguous() for k, v in state.items()}, str(self.out / "start.safetensors"))
        local = {n: (p.to_local() if isinstance(p, DTensor) else p).numel() for n, p in model.named_parameters()}
        buffers = {n: b.double().sum().item() for n, b in model.named_buffers() if b.is_floating_point()}
        (self.out / f"start-{trainer.global_rank}.json").write_text(json.dumps(
            {"read": ELEMENTS_READ, "local": local, "global": {n: p.numel() for n, p in model.named_parameters()},
             "buffers": buffers}))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with open(self.out / f"steps-{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "loss": loss.item(), "keys": list(batch["key"])}) + "\n")
        if self.signal_at and trainer.global_step == self.signal_at and trainer.global_rank == 0:
            os.kill(os.getpid(), signal.SIGUSR1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, out: Path, recipe: str, *overrides: str, signal_at: int = 0, timeout: float = 600) -> list[str]:
    """Run `n` ranks of this driver to completion; returns their outputs (raises if one failed).

    The rendezvous port is free when picked but may be taken before rank 0 binds it (other tests' gloo
    connections use the same ephemeral ports): a start that fails on that is tried once more."""
    try:
        return _launch(n, out, recipe, *overrides, signal_at=signal_at, timeout=timeout)
    except AssertionError as err:
        if "address already in use" not in str(err).lower():
            raise
        return _launch(n, out, recipe, *overrides, signal_at=signal_at, timeout=timeout)


def _launch(n: int, out: Path, recipe: str, *overrides: str, signal_at: int, timeout: float) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(n):
        env = {**os.environ, "LOCAL_RANK": str(rank), "NODE_RANK": "0", "WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "SIGNAL_AT_STEP": str(signal_at), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "tests.dist_fit", str(out), recipe, *overrides]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        if p.returncode != 0:
            raise AssertionError(f"rank {rank} exited with {p.returncode}:\n{log[-4000:]}")
    return logs


def steps(out: Path, rank: int = 0) -> list[dict]:
    return [json.loads(line) for line in (out / f"steps-{rank}.jsonl").read_text().splitlines()]


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    from pandora_lightning.recipe import load_recipe
    from pandora_lightning.training.fit import fit

    import torch.distributed as dist

    out_dir, recipe_path, *overrides = sys.argv[1:]
    fit(load_recipe(recipe_path, overrides), callbacks=[StepLog(Path(out_dir), int(os.environ.get("SIGNAL_AT_STEP", "0")))])
    # fit tears the process group down itself (see parallel.end_process_group); then the rank leaves as
    # the CLI's fit verb does (parallel.leave_process)
    from pandora_lightning.training.parallel import leave_process

    (Path(out_dir) / f"ended-{os.environ['LOCAL_RANK']}.json").write_text(json.dumps({"group_left": dist.is_initialized()}))
    leave_process(0)
