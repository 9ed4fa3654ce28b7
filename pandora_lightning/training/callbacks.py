"""Lightning callbacks of the data path: data-wait and corrupt-sample metrics, and the random state
that an exact resume needs besides the loader's own position (see `loader.ShardLoader`)."""
from __future__ import annotations

import random
import time

import lightning as L
import numpy as np
import torch

from pandora_lightning.data.loader import ShardLoader, dist_info, gather_from_ranks


class DataMonitor(L.Callback):
    """Logs, every step, for the `ShardLoader` being trained on:

    - `data/wait_frac`: the share of the wall time (from one step's end to the next) that training
      spent waiting in the loader for its batch, since the run's first step (the first batch, which
      also starts the workers, is not counted; later epochs' worker start-ups are);
    - `data/seen_samples`, `data/bad_samples`: samples decoded and corrupt samples skipped so far,
      summed over all ranks (the workers report them in their batches; `ShardLoader` adds them up).
    """

    def on_train_start(self, trainer, pl_module) -> None:
        loader = trainer.train_dataloader
        self.loader = loader if isinstance(loader, ShardLoader) else None
        self.last_end: float | None = None
        self.wait_s = self.total_s = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if getattr(self, "loader", None) is None:
            return
        if self.last_end is not None:
            self.wait_s += self.loader.last_wait_s
            self.total_s += now - self.last_end
        self.last_end = now
        values = torch.tensor([self.wait_s, self.total_s, self.loader.seen, self.loader.bad], dtype=torch.float64)
        if trainer.world_size > 1:  # one small reduction a step; every rank logs the same numbers
            values = trainer.strategy.reduce(values.to(pl_module.device), reduce_op="sum").cpu()
        wait, total, seen, bad = values.tolist()
        metrics = {"data/seen_samples": seen, "data/bad_samples": bad}
        if total > 0:
            metrics["data/wait_frac"] = wait / total
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)


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
