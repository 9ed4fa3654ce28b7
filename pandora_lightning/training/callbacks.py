"""Lightning callbacks of the data path: data-wait and corrupt-sample metrics, and the random state
that an exact resume needs besides the loader's own position (see `loader.ShardLoader`)."""
from __future__ import annotations

import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from pandora_lightning.data.loader import ShardLoader, dist_info, gather_from_ranks


class DataMonitor(L.Callback):
    """Logs, every step, for the `ShardLoader` being trained on:

    - `data/wait_frac`: the share of the wall time (from one step's end to the next) that training
      spent waiting in the loader for its batch, since the run's first step (the first batch, which
      also starts the workers, is not counted; later epochs' worker start-ups are);
    - `data/seen_samples`: samples read, summed over all ranks; `data/bad_samples`: corrupt samples,
      each counted once per run (by shard and key) across ranks, epochs and resumes;
      `data/no_text_samples`: sound samples skipped for lack of the stage's text kind.

    When the corrupt samples pass the limit (`data.max_bad_fraction`, `data.min_bad_samples`) it
    writes `last.ckpt` in the checkpoint folder and stops training; `stop_reason` then says why.
    Every rank takes the same decision from the same merged numbers, so DDP stops together.
    """

    def __init__(self):
        self.stop_reason: str | None = None
        self.stop_checkpoint: Path | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        loader = trainer.train_dataloader
        self.loader = loader if isinstance(loader, ShardLoader) else None
        self.last_end: float | None = None
        self.wait_s = self.total_s = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        loader = getattr(self, "loader", None)
        if loader is None:
            return
        if self.last_end is not None:
            self.wait_s += loader.last_wait_s
            self.total_s += now - self.last_end
        self.last_end = now
        values = torch.tensor([self.wait_s, self.total_s, loader.seen, loader.no_text, len(loader.new_bad)],
                              dtype=torch.float64)
        if trainer.world_size > 1:  # one small reduction a step; every rank logs the same numbers
            values = trainer.strategy.reduce(values.to(pl_module.device), reduce_op="sum").cpu()
        wait, total, seen, no_text, new_bad = values.tolist()
        if new_bad and trainer.world_size > 1:  # only when some rank found a new corrupt sample
            for where, reason in (item for rank in gather_from_ranks(loader.new_bad) for item in rank):
                loader.add_bad(where, reason, log_it=False)
        loader.new_bad = []
        metrics = {"data/seen_samples": seen, "data/bad_samples": float(loader.bad), "data/no_text_samples": no_text}
        if total > 0:
            metrics["data/wait_frac"] = wait / total
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        reason = loader.stop_reason(int(seen))
        if reason is not None and self.stop_reason is None:
            self.stop_reason = f"stopped at step {trainer.global_step}: {reason}"
            folder = Path(trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else trainer.default_root_dir)
            self.stop_checkpoint = folder / "last.ckpt"
            trainer.save_checkpoint(self.stop_checkpoint)
            trainer.should_stop = True


class RandomState(L.Callback):
    """Saves the global random states (torch, numpy, random; CUDA when present) of every rank in
    checkpoints and restores them when training starts from one, so that a resumed run draws the
    same diffusion noise and timesteps as a run that was never stopped. (Lightning restores weights,
    optimiser, schedulers, loop counters and stateful loaders, but not these.) They are restored
    at `on_train_start`, after everything that consumes randomness while a run is set up."""

    def __init__(self):
        self._to_restore: dict | None = None

    def state_dict(self) -> dict:
        # numpy's state as tensors and numbers: Lightning loads checkpoints with weights_only=True
        _, keys, pos, has_gauss, gauss = np.random.get_state()
        numpy_state = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "gauss": float(gauss)}
        state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return {"ranks": gather_from_ranks(state)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._to_restore = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        if self._to_restore is None:
            return
        ranks = self._to_restore["ranks"]
        state = ranks[dist_info()[0] % len(ranks)]
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        self._to_restore = None
