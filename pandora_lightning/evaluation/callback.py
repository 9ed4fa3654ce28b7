"""Scoring during fit: the `score` metrics on a fixed set of held-out rollouts, every N steps.

Enabled by the recipe's `eval` block (`eval.every_n_steps > 0`) and added to the Trainer by the
caller of `fit` (see `cli.py`). Each process rolls out its own share of the episodes; the metrics
sum their states across processes, so every rank logs the same numbers (as `score/<metric>`, e.g.
`score/action_following`).
"""
from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from pandora_lightning.data.manifest import load_manifest
from pandora_lightning.evaluation.config import EvalConfig
from pandora_lightning.evaluation.loop import load_episodes, run_episodes
from pandora_lightning.evaluation.suite import EpisodeMetrics, MetricSuite, load_weights


class ScoreCallback(L.Callback):
    def __init__(self, cfg: EvalConfig, manifest: str, plugins: Sequence[EpisodeMetrics] = (), allow_commands: bool = False):
        self.cfg, self.manifest, self.plugins = cfg, cfg.manifest or manifest, list(plugins)
        self.allow_commands = allow_commands  # the recipe's data.allow_commands
        self.all_episodes: list = []  # what the metrics are laid out for (domains), the same on every rank
        self.episodes: list = []  # this rank's share
        self.weights = None
        self.last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        manifest = load_manifest(self.manifest, allow_commands=self.allow_commands)
        size = pl_module.model.cfg.generator.size
        episodes = load_episodes(manifest, self.cfg.split, self.cfg.per_domain, size)
        self.all_episodes, self.episodes = episodes, episodes[trainer.global_rank :: trainer.world_size]
        self.weights = load_weights(self.cfg)
        rank_zero_info(
            f"[score] every {self.cfg.every_n_steps} steps on {len(episodes)} '{self.cfg.split}' episodes of {self.manifest}"
            + "".join(f"; {name} skipped: {why}" for name, why in self.weights[2].items())
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.cfg.every_n_steps == 0 and step != self.last_step:
            self.last_step = step
            self.score(trainer, pl_module)

    def score(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        model = pl_module.model
        detector, embedder, reasons = self.weights
        suite = MetricSuite(self.all_episodes, model.cond_frames, model.new_frames, detector, embedder, reasons, self.plugins)
        suite.to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        # fork_rng: scoring must not shift the training run's random stream.
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        try:
            # the Trainer's autocast: frozen parts are in the compute dtype under *-mixed precisions
            with torch.random.fork_rng(devices=devices), trainer.precision_plugin.forward_context():
                run_episodes(model, self.episodes, suite, self.cfg.batch_size, self.cfg.seed)
        finally:
            pl_module.train(was_training)
        values = {f"score/{name}": value for name, value in suite.scalars().items()}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
        return values
