"""SLURM: ranks from a simulated 2 nodes x 2 tasks allocation, the layout check, the sbatch script."""
from __future__ import annotations

import shutil

import lightning as L
import pytest

from pandora_lightning.cli import main
from pandora_lightning.errors import PandoraError
from pandora_lightning.training.cluster import SlurmJob, check_slurm_layout, cluster_plugins, sbatch_script
from pandora_lightning.training.parallel import ParallelConfig, build_strategy
from tests.conftest import RECIPES


def slurm_env(monkeypatch, procid: int, nodes: int = 2, per_node: int = 2) -> None:
    for key, value in {"SLURM_NTASKS": nodes * per_node, "SLURM_NNODES": nodes, "SLURM_NTASKS_PER_NODE": per_node,
                       "SLURM_PROCID": procid, "SLURM_LOCALID": procid % per_node, "SLURM_NODEID": procid // per_node,
                       "SLURM_JOB_NAME": "pandora", "SLURM_JOB_ID": 1234, "SLURM_NODELIST": "node[7-8]"}.items():
        monkeypatch.setenv(key, str(value))
    # Lightning's SLURMEnvironment writes MASTER_ADDR/MASTER_PORT into os.environ; keep them from
    # leaking into later tests (a later 2-rank fit would dial the simulated node7 forever).
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "unset")  # recorded as absent, so teardown removes what Lightning wrote
        monkeypatch.delenv(key)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_each_task_gets_its_rank_in_a_two_node_allocation(monkeypatch, strategy):
    seen = []
    for procid in range(4):
        slurm_env(monkeypatch, procid)
        check_slurm_layout(devices=2, num_nodes=2)
        trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=2, strategy=build_strategy(ParallelConfig(strategy), "auto"),
                            plugins=cluster_plugins(), logger=False, enable_checkpointing=False, enable_progress_bar=False)
        env = trainer.strategy.cluster_environment
        assert not env.auto_requeue, "Lightning's in-handler requeue is off (Requeue saves at a step boundary)"
        seen.append((trainer.global_rank, trainer.world_size, trainer.local_rank, trainer.node_rank, env.main_address))
    assert seen == [(0, 4, 0, 0, "node7"), (1, 4, 1, 0, "node7"), (2, 4, 0, 1, "node7"), (3, 4, 1, 1, "node7")]


def test_a_layout_that_differs_from_the_allocation_is_refused(monkeypatch, capsys):
    slurm_env(monkeypatch, 0)
    with pytest.raises(PandoraError, match="SLURM started 4 task\\(s\\) on 2 node\\(s\\).*trainer.devices=2 trainer.num_nodes=2"):
        check_slurm_layout(devices=1, num_nodes=1)
    with pytest.raises(PandoraError):
        check_slurm_layout(devices=4, num_nodes=1)
    assert main(["fit", str(RECIPES / "tiny" / "align.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: SLURM started 4 task(s)") and "\n" not in err
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # an interactive allocation: the user launches processes
    check_slurm_layout(devices=1, num_nodes=1)


def test_sbatch_script(tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    assert main(["slurm", str(RECIPES / "tiny" / "instruct.yaml"), "parallel.strategy=fsdp2", f"run_dir={tmp_path / 'run'}",
                 "--nodes", "2", "--gpus-per-node", "4", "--time", "04:00:00", "--partition", "gpu", "--out", str(out)]) == 0
    script = out.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gres=gpu:4", "#SBATCH --time=04:00:00",
                 "#SBATCH --signal=USR1@90", "#SBATCH --requeue", "#SBATCH --partition=gpu", f"#SBATCH --output={tmp_path}/run/slurm/"):
        assert line in script, line
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "-m pandora_lightning fit" in srun and "parallel.strategy=fsdp2" in srun
    assert "trainer.devices=4 trainer.num_nodes=2" in srun and srun.endswith('${RESUME[@]+"${RESUME[@]}"}')
    assert f"compgen -G {tmp_path}/run/checkpoints'/last*.ckpt'" in script and "RESUME=(trainer.resume_from=last)" in script
    assert (tmp_path / "run" / "slurm").is_dir(), "SLURM does not create the log folder itself"
    assert script in capsys.readouterr().out


def test_slurm_options_that_contradict_the_recipe_are_refused(tmp_path):
    job = SlurmJob("r.yaml", nodes=2, gpus_per_node=4, time="1:00:00", overrides=("trainer.devices=8",))
    with pytest.raises(PandoraError, match="trainer.devices=8 contradicts --gpus-per-node 4"):
        sbatch_script(job, str(tmp_path), "python")
    job = SlurmJob("r.yaml", nodes=2, gpus_per_node=4, time="1:00:00", overrides=("trainer.resume_from=x.ckpt",))
    with pytest.raises(PandoraError, match="would restart a requeued job"):
        sbatch_script(job, str(tmp_path), "python")
    if shutil.which("sbatch") is None:  # --submit without sbatch: one line, after the script is written
        assert main(["slurm", str(RECIPES / "tiny" / "instruct.yaml"), f"run_dir={tmp_path / 'run'}", "--nodes", "1",
                     "--gpus-per-node", "2", "--time", "1:00:00", "--out", str(tmp_path / "j.sbatch"), "--submit"]) == 2
        assert (tmp_path / "j.sbatch").is_file()
