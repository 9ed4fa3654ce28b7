"""A run folder is never overwritten silently, never shared by two runs, and keeps its whole history.

- `claim_run_folder` (rank 0, before the model loads): a folder that already holds files is refused
  unless the run resumes (`trainer.resume_from`) or the user asks to overwrite it (`fit --overwrite`,
  which removes the earlier run's files first); `resume_from=last` with no last checkpoint is an error;
  a lock file (`.lock`: host, pid, start time) stops a second run in the same folder until the first
  ends (a lock left by a process that died on this host is taken over).
- `HistoryCSVLogger`: Lightning's CSV logger deletes `logs/metrics.csv` when a run starts; this one
  keeps it on resume: rows logged before the step training resumes from stay, rows logged after it
  (the interrupted run went on past its last checkpoint) are dropped, since the resumed run logs
  those steps again. The result is one complete history.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from pandora_lightning.errors import PandoraError

log = logging.getLogger(__name__)
LOCK = ".lock"
# What a run writes into its folder; `--overwrite` removes these (and nothing else).
RUN_FILES = ("checkpoints", "logs", "recipe.yaml", "trainable.txt", "scores", "rollouts", "summary.json")


class RunLock:
    """An exclusive lock file in the run folder; `release()` removes it."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.held = False

    def acquire(self) -> None:
        mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_stale()  # raises unless the holder is gone (then try again)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
            self.held = True
            return
        raise PandoraError(self._in_use_message())

    def _owner(self) -> dict:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) else {}
        except (OSError, ValueError):
            return {}

    def _take_over_stale(self) -> None:
        """Remove a lock whose process is gone from this host; otherwise raise that the folder is in use."""
        owner = self._owner()
        if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
            raise PandoraError(self._in_use_message())
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            log.warning("taking over %s: the run that held it (pid %s, started %s) is gone", self.path, owner["pid"],
                        owner.get("started"))
            self.path.unlink(missing_ok=True)
            return
        except PermissionError:
            pass
        raise PandoraError(self._in_use_message())

    def _in_use_message(self) -> str:
        owner = self._owner()
        who = f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('started')}" if owner else "another run"
        return (f"run folder {self.path.parent} is in use by another run ({who}); wait for it to end, choose another "
                f"run_dir, or delete {self.path} if that run is gone")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def check_resume(run_dir: Path, resume_from: str | None) -> None:
    if resume_from == "last":
        folder = run_dir / "checkpoints"
        if not folder.is_dir() or not any(p.stem.startswith("last") and p.suffix == ".ckpt" for p in folder.iterdir()):
            raise PandoraError(
                f"trainer.resume_from=last, but {folder} holds no last.ckpt to resume from; drop resume_from to start "
                f"a new run, or give the path of a checkpoint"
            )
    elif resume_from and not Path(resume_from).exists():  # a file, or a sharded (fsdp2) folder
        raise PandoraError(f"trainer.resume_from={resume_from}: no such checkpoint file")


def claim_run_folder(run_dir: Path, resume_from: str | None, overwrite: bool) -> RunLock:
    """Lock `run_dir` for this run after checking it may be written (see the module docstring)."""
    check_resume(run_dir, resume_from)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        held = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)
        if held and not resume_from:
            if not overwrite:
                raise PandoraError(
                    f"run folder {run_dir} already holds a run ({', '.join(held[:5])}{' ...' if len(held) > 5 else ''}); "
                    f"resume it with trainer.resume_from=last, choose another run_dir, or pass --overwrite to replace it"
                )
            for name in RUN_FILES:
                path = run_dir / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            log.warning("--overwrite: removed the earlier run's %s from %s", ", ".join(n for n in held if n in RUN_FILES),
                        run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


class _HistoryWriter(ExperimentWriter):
    keep_below: int | None = None  # the step training resumed from; set at train start
    _reconciled = False

    def _check_log_dir_exists(self) -> None:
        pass  # Lightning's writer deletes metrics.csv here

    def save(self) -> None:
        if self.metrics and not self._reconciled and os.path.isfile(self.metrics_file_path):
            self._reconciled = True
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.DictReader(f)
                rows, header = list(reader), reader.fieldnames or []
            kept = [r for r in rows if self.keep_below is None or _step(r) < self.keep_below]
            self.metrics_keys = sorted(set(header) | set(self.metrics_keys))
            with open(self.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
        if self.metrics:
            self._reconciled = True
        super().save()


def _step(row: dict) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


class HistoryCSVLogger(CSVLogger):
    """CSVLogger whose logs/metrics.csv survives resumes (see the module docstring)."""

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(log_dir=self.log_dir)
        return self._experiment


class KeepLogHistory(L.Callback):
    """Tells the CSV history where training (re)starts, once the checkpoint has been restored."""

    def on_train_start(self, trainer, pl_module) -> None:
        if isinstance(trainer.logger, HistoryCSVLogger) and trainer.is_global_zero:
            trainer.logger.experiment.keep_below = trainer.global_step
