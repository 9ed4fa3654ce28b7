"""`fit`: recipe -> data stream, stage module and Lightning Trainer -> checkpoints in the run folder."""
from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from pandora_lightning.config import ConfigError, RecipeConfig
from pandora_lightning.data.dataset import BadSampleCounter, ExampleDecoder, training_stream
from pandora_lightning.data.manifest import load_manifest
from pandora_lightning.stages import STAGES, WorldModelStage


def train_loader(recipe: RecipeConfig, text_kind: str) -> DataLoader:
    data = recipe.data
    gen = recipe.model.generator
    counter = BadSampleCounter(data.max_bad_fraction)
    decoder = ExampleDecoder(text_kind, gen.frames, gen.cond_frames, counter)
    stream = training_stream(load_manifest(data.manifest), data.split, decoder, data.shuffle_buffer, recipe.seed)
    return DataLoader(
        stream, batch_size=data.batch_size, num_workers=data.num_workers, persistent_workers=data.num_workers > 0
    )


def _logger(recipe: RecipeConfig, run_dir: Path):
    if recipe.trainer.logger == "csv":
        return CSVLogger(save_dir=run_dir, name="logs", version="")
    if recipe.trainer.logger == "tensorboard":
        try:
            return TensorBoardLogger(save_dir=run_dir, name="logs", version="")
        except ModuleNotFoundError:
            raise ConfigError("trainer.logger=tensorboard needs `pip install tensorboard`; or use trainer.logger=csv") from None
    return False


def build_trainer(recipe: RecipeConfig, run_dir: Path, **overrides) -> L.Trainer:
    cfg = recipe.trainer
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", every_n_train_steps=cfg.checkpoint_every_n_steps, save_top_k=1, save_last=True
    )
    kwargs = dict(
        max_steps=cfg.max_steps,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=cfg.precision,
        gradient_clip_val=cfg.gradient_clip_val or None,
        log_every_n_steps=cfg.log_every_n_steps,
        logger=_logger(recipe, run_dir),
        callbacks=[checkpoints],
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def fit(recipe: RecipeConfig) -> Path:
    """Train one stage as the recipe says; returns the path of the final checkpoint."""
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    run_dir = Path(recipe.run_dir)
    stage_cls = STAGES[recipe.stage]
    module: WorldModelStage = stage_cls.from_recipe(recipe)
    if recipe.init_from:
        module.init_from(recipe.init_from)
    loader = train_loader(recipe, recipe.data.text_kind or stage_cls.text_kind)
    trainer = build_trainer(recipe, run_dir)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(recipe), run_dir / "recipe.yaml")
        (run_dir / "trainable.txt").write_text("\n".join(module.trainable_names) + "\n")
    trainer.fit(module, loader)
    final = run_dir / "checkpoints" / "final.ckpt"
    trainer.save_checkpoint(final)
    return final
