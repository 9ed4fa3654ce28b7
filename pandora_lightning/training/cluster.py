"""SLURM: the process layout check, requeue on the time-limit signal, and the sbatch script.

SLURM starts every process itself (`srun`, one task per GPU); Lightning then reads each task's rank
from SLURM_PROCID. If the recipe's devices x num_nodes differs from the tasks SLURM started,
Lightning does not say so: each task trains alone as rank 0 of world size 1, all writing one run
folder. `check_slurm_layout` refuses that before anything starts.

Requeue: `#SBATCH --signal=USR1@90` sends SIGUSR1 to every task 90 s before the time limit.
`Requeue`'s handler only sets a flag; at the next step boundary the ranks agree on it (one tiny
all-reduce), all of them write `checkpoints/last.ckpt` together, rank 0 asks SLURM to requeue the
job and training stops. The requeued job runs the same script, which resumes from `last`. Lightning's
own SLURM handler saves from inside the signal handler, where the collectives of the data-loader
and random-state callbacks (and of a sharded save) can deadlock against a rank that is elsewhere;
it is switched off (`SLURMEnvironment(auto_requeue=False)`).
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from pandora_lightning.errors import PandoraError


def slurm_tasks() -> dict | None:
    """The task layout SLURM gave this process, or None outside a SLURM job step (or in an
    interactive allocation, job name bash/interactive, where the user launches processes)."""
    env = os.environ
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    return {
        "ntasks": int(env["SLURM_NTASKS"]),
        "nnodes": int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1"))),
        "ntasks_per_node": env.get("SLURM_NTASKS_PER_NODE"),
        "procid": int(env.get("SLURM_PROCID", "0")),
    }


def check_slurm_layout(devices: int, num_nodes: int) -> None:
    """Under SLURM: trainer.devices x trainer.num_nodes must be the number of tasks SLURM started."""
    tasks = slurm_tasks()
    if tasks is None:
        return
    if devices * num_nodes != tasks["ntasks"] or num_nodes != tasks["nnodes"]:
        per_node = tasks["ntasks_per_node"] or f"{tasks['ntasks'] // max(1, tasks['nnodes'])}"
        raise PandoraError(
            f"SLURM started {tasks['ntasks']} task(s) on {tasks['nnodes']} node(s) but the recipe asks for "
            f"trainer.devices={devices} x trainer.num_nodes={num_nodes} = {devices * num_nodes} process(es); every task "
            f"would train alone as rank 0. Set trainer.devices={per_node.split('(')[0]} trainer.num_nodes={tasks['nnodes']} "
            f"(or match #SBATCH --nodes/--ntasks-per-node to the recipe)"
        )


def cluster_plugins() -> list:
    """Under SLURM: Lightning's SLURM environment without its in-handler requeue (see module docstring)."""
    if slurm_tasks() is None:
        return []
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)]


class Requeue(L.Callback):
    """SIGUSR1 -> checkpoint at the next step boundary on every rank -> `scontrol requeue` -> stop."""

    def __init__(self, signum: int = signal.SIGUSR1):
        self.signum = signum
        self.requested = False  # set by the handler, read at step boundaries
        self.stopped = False  # this run stopped for a requeue (fit then writes no final checkpoint)
        self._previous = None

    def _handler(self, signum, frame) -> None:
        self.requested = True  # nothing else here: no I/O, no collectives

    def on_train_start(self, trainer, pl_module) -> None:
        self._previous = signal.signal(self.signum, self._handler)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        flag = torch.tensor(float(self.requested), device=pl_module.device)
        if trainer.world_size > 1:  # a rank may get the signal a moment after the others
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        if flag.item() == 0 or self.stopped:
            return
        self.stopped = True
        checkpoint = trainer.checkpoint_callback
        # Through ModelCheckpoint, so that `resume_from=last` finds it and it is not saved twice.
        checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))
        rank_zero_info(f"requeue signal: saved {checkpoint.last_model_path} at step {trainer.global_step}; stopping")
        job = os.environ.get("SLURM_JOB_ID")
        if trainer.is_global_zero and job and shutil.which("scontrol"):
            subprocess.run(["scontrol", "requeue", job], check=False)
        trainer.should_stop = True


# --- the sbatch script -------------------------------------------------------------------------


@dataclass
class SlurmJob:
    recipe: str
    nodes: int
    gpus_per_node: int
    time: str
    overrides: tuple[str, ...] = ()
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None
    cpus_per_task: int = 8
    mem: str | None = None
    env_setup: str = ""  # e.g. "source .venv/bin/activate"


def _override_keys(overrides) -> dict[str, str]:
    return {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if "=" in o}


def sbatch_script(job: SlurmJob, run_dir: str, python: str) -> str:
    """A complete sbatch script: one task per GPU, srun, requeue on USR1, logs in the run folder."""
    given = _override_keys(job.overrides)
    for key, want in (("trainer.devices", job.gpus_per_node), ("trainer.num_nodes", job.nodes)):
        if key in given and given[key] != str(want):
            raise PandoraError(
                f"slurm: {key}={given[key]} contradicts --{'gpus-per-node' if key.endswith('devices') else 'nodes'} {want}; "
                f"drop the override (the script sets it)"
            )
    if "trainer.resume_from" in given and given["trainer.resume_from"] != "last":
        raise PandoraError(
            f"slurm: trainer.resume_from={given['trainer.resume_from']} would restart a requeued job from that checkpoint "
            f"again; start from its weights with init_from=... instead (the script resumes from last)"
        )
    rest = [o for o in job.overrides if o.split("=", 1)[0] not in ("trainer.devices", "trainer.num_nodes", "trainer.resume_from")]
    args = [job.recipe, *rest, f"trainer.devices={job.gpus_per_node}", f"trainer.num_nodes={job.nodes}",
            "trainer.accelerator=gpu"]
    checkpoints = shlex.quote(str(Path(run_dir) / "checkpoints"))
    logs = Path(run_dir) / "slurm"
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job.job_name or Path(run_dir).parent.name + '-' + Path(run_dir).name}",
        f"#SBATCH --nodes={job.nodes}",
        f"#SBATCH --ntasks-per-node={job.gpus_per_node}",
        f"#SBATCH --gres=gpu:{job.gpus_per_node}",
        f"#SBATCH --cpus-per-task={job.cpus_per_task}",
        f"#SBATCH --time={job.time}",
        "#SBATCH --signal=USR1@90",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --chdir={Path.cwd()}",
        f"#SBATCH --output={logs}/%x-%j.out",
        f"#SBATCH --error={logs}/%x-%j.err",
    ]
    if job.partition:
        lines.append(f"#SBATCH --partition={job.partition}")
    if job.account:
        lines.append(f"#SBATCH --account={job.account}")
    if job.mem:
        lines.append(f"#SBATCH --mem={job.mem}")
    lines += [
        "",
        "# Written by `pandora-lightning slurm`. SIGUSR1 (90 s before the time limit) makes every rank",
        "# checkpoint at the next step and requeue the job; the requeued job resumes from checkpoints/last.ckpt.",
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(str(logs))}",
    ]
    if job.env_setup:
        lines.append(job.env_setup)
    lines += [
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
        "export NCCL_ASYNC_ERROR_HANDLING=1",
        f"echo \"job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST\"",
        "# the first start trains from scratch; a requeued one resumes from checkpoints/last.ckpt",
        f"RESUME=(); if compgen -G {checkpoints}'/last*.ckpt' > /dev/null; then RESUME=(trainer.resume_from=last); fi",
        f"srun --kill-on-bad-exit=1 {shlex.quote(python)} -m pandora_lightning fit " + " ".join(shlex.quote(a) for a in args)
        + ' ${RESUME[@]+"${RESUME[@]}"}',  # (an empty array under set -u in older bash)
        "",
    ]
    return "\n".join(lines)


def submit(script: Path) -> str:
    if shutil.which("sbatch") is None:
        raise PandoraError(f"slurm --submit: no sbatch on this machine; submit {script} from a SLURM login node")
    out = subprocess.run(["sbatch", str(script)], capture_output=True, text=True)
    if out.returncode != 0:
        raise PandoraError(f"sbatch {script} failed: {(out.stderr or out.stdout).strip().splitlines()[-1]}")
    return out.stdout.strip()
