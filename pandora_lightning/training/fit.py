"""`fit`: recipe -> data stream, stage module and Lightning Trainer -> checkpoints in the run folder.

Callbacks from outside training (fit-time scoring) are passed in by the caller, which composes
them (see `cli.py`): training itself knows nothing of evaluation."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import OmegaConf

from pandora_lightning.data.dataset import check_recolor, check_text_kind
from pandora_lightning.data.loader import ShardLoader, training_loader
from pandora_lightning.data.manifest import load_manifest
from pandora_lightning.errors import PandoraError
from pandora_lightning.training.adapt import init_adapt_from, with_base_model
from pandora_lightning.training.callbacks import DataMonitor, RandomState
from pandora_lightning.training.checkpoint import init_from, load_checkpoint_file
from pandora_lightning.training.cluster import Requeue, check_slurm_layout, cluster_plugins
from pandora_lightning.training.ema import WeightEMA
from pandora_lightning.training.parallel import (
    build_strategy,
    check_machine,
    end_process_group,
    full_state_dict,
    trainer_precision,
)
from pandora_lightning.training.model_file import write_model_file
from pandora_lightning.training.recipe import TrainingRecipe
from pandora_lightning.training.run_folder import HistoryCSVLogger, KeepLogHistory, check_resume, claim_run_folder
from pandora_lightning.training.precompute import check_precomputed
from pandora_lightning.training.sharded import check_resume_form
from pandora_lightning.training.stage import STAGES, WorldModelStage
from pandora_lightning.training.vocabulary import needs_vocabulary, resolve_vocabulary, training_texts, warn_unknown_words

log = logging.getLogger(__name__)


def train_loader(recipe: TrainingRecipe, text_kind: str) -> ShardLoader:
    """Split, mixed, resumable shard batches (see pandora_lightning/data/loader.py and stream.py)."""
    gen = recipe.model.generator
    try:
        check_recolor(recipe.data.recolor, text_kind)
    except ValueError as err:
        raise PandoraError(str(err)) from None
    manifest = load_manifest(recipe.data.manifest, allow_commands=recipe.data.allow_commands)
    check_text_kind(manifest, recipe.data.split, text_kind, gen.cond_frames)
    return training_loader(manifest, recipe.data, text_kind, gen.frames, gen.cond_frames, gen.size, recipe.seed)


def _logger(recipe: TrainingRecipe, run_dir: Path):
    if recipe.trainer.logger == "csv":
        return HistoryCSVLogger(save_dir=run_dir, name="logs", version="")
    if recipe.trainer.logger == "tensorboard":
        try:
            return TensorBoardLogger(save_dir=run_dir, name="logs", version="")
        except ModuleNotFoundError:
            raise PandoraError("trainer.logger=tensorboard needs `pip install tensorboard`; or use trainer.logger=csv") from None
    return False


def build_trainer(recipe: TrainingRecipe, run_dir: Path, extra_callbacks: list[L.Callback] = (), **overrides) -> L.Trainer:
    cfg = recipe.trainer
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", every_n_train_steps=cfg.checkpoint_every_n_steps, save_top_k=1, save_last=True
    )
    kwargs = dict(
        max_steps=cfg.max_steps,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=build_strategy(recipe.parallel, cfg.strategy),
        precision=trainer_precision(recipe.parallel, cfg.precision),
        accumulate_grad_batches=recipe.parallel.accumulate_grad_batches,
        plugins=cluster_plugins(),
        gradient_clip_val=cfg.gradient_clip_val or None,
        log_every_n_steps=cfg.log_every_n_steps,
        logger=_logger(recipe, run_dir),
        callbacks=[checkpoints, DataMonitor(), RandomState(), KeepLogHistory(),
                   *([WeightEMA(cfg.ema_decay)] if cfg.ema_decay else []), *extra_callbacks],
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
    kwargs.update(overrides)
    try:
        return L.Trainer(**kwargs)
    except (MisconfigurationException, ValueError, RuntimeError) as err:  # e.g. fsdp on a machine without a GPU
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PandoraError(
            f"trainer: {first} (trainer.strategy={cfg.strategy}, trainer.accelerator={cfg.accelerator}, "
            f"trainer.devices={cfg.devices}, trainer.precision={cfg.precision})"
        ) from None


def fit(recipe: TrainingRecipe, callbacks: list[L.Callback] = (), overwrite: bool = False) -> Path:
    """Train one stage as the recipe says; returns the path of the final checkpoint (a folder under
    parallel.strategy=fsdp2), or of `last` when a requeue signal stopped the run.

    The run folder must be new, or resumed (`trainer.resume_from`), or `overwrite` (see run_folder.py).
    """
    check_slurm_layout(recipe.trainer.devices, recipe.trainer.num_nodes)
    check_machine(recipe.parallel, recipe.trainer.devices, recipe.trainer.num_nodes)
    if recipe.trainer.ema_decay and recipe.parallel.strategy == "fsdp2":
        raise PandoraError("trainer.ema_decay keeps a whole copy of the trained weights on every rank, which "
                           "parallel.strategy=fsdp2 shards; set trainer.ema_decay=0 (or train with ddp)")
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    if recipe.stage == "adapt":
        recipe = with_base_model(recipe)
    run_dir = Path(recipe.run_dir)
    if recipe.trainer.resume_from:  # refused in one line before anything is built (a pickle that would run code, ...)
        resume = run_dir / "checkpoints" / "last.ckpt" if recipe.trainer.resume_from == "last" else recipe.trainer.resume_from
        if Path(resume).is_file():
            load_checkpoint_file(resume)
    stage_cls = STAGES[recipe.stage]
    check_resume(run_dir, recipe.trainer.resume_from)  # the cheap checks first, before the model loads
    check_resume_form(run_dir, recipe.trainer.resume_from, recipe.parallel.strategy == "fsdp2")
    loader = train_loader(recipe, recipe.data.text_kind or stage_cls.text_kind)
    trainer = build_trainer(recipe, run_dir, [*callbacks, Requeue()])
    lock = claim_run_folder(run_dir, recipe.trainer.resume_from, overwrite) if trainer.is_global_zero else None
    try:
        return _fit(recipe, run_dir, stage_cls, loader, trainer)
    finally:
        if lock is not None:
            lock.release()
        end_process_group()


def warn_window_beyond_training(recipe: TrainingRecipe) -> bool:
    """Log one warning when a history model's window (llm.history_rounds) reads farther back than the
    multi-round windows it trains on (data.rounds): from that round on, a session reads distances that
    training never showed. Returns whether it warned."""
    window, rounds = recipe.model.llm.history_rounds, recipe.data.rounds
    if rounds <= 1 or 0 < window <= rounds:
        return False
    said = "every earlier round (0)" if window == 0 else f"{window} rounds"
    log.warning(f"model.llm.history_rounds reads {said}, but data.rounds={rounds} trains windows of {rounds}: from "
                f"round {rounds + 1} on a session reads farther back than training showed; set "
                f"model.llm.history_rounds={rounds} (or train data.rounds={window or 'as long as your sessions'})")
    return True


def _fit(recipe: TrainingRecipe, run_dir: Path, stage_cls, loader: ShardLoader, trainer: L.Trainer) -> Path:
    texts = training_texts(recipe) if needs_vocabulary(recipe) else []
    vocabulary = resolve_vocabulary(recipe, texts)
    # fsdp2: pretrained weights stay on the meta device until each rank reads its shards (configure_model);
    # the adapt stage merges its base checkpoint's LoRA into the weights, which needs them all in memory.
    lazy = recipe.parallel.lazy and recipe.stage != "adapt"
    module: WorldModelStage = stage_cls.from_recipe(recipe, vocabulary, lazy=lazy)
    if recipe.stage == "adapt":
        init_adapt_from(module, recipe.init_from)
    elif recipe.init_from:
        init_from(module, recipe.init_from)
    if module.lazy_weights is not None:  # every tensor's source checked against the files' headers now
        module.lazy_weights.check(module.model)
    if recipe.data.precomputed:  # after init_from: encoders trained in an earlier stage come from its checkpoint
        check_precomputed(recipe, module.model)
    counts = [sum(p.numel() for p in module.parameters() if p.requires_grad is on) for on in (True, False)]
    check_machine(recipe.parallel, recipe.trainer.devices, recipe.trainer.num_nodes, *counts)
    if texts and trainer.is_global_zero:
        warn_unknown_words(vocabulary, texts)
    if trainer.is_global_zero:
        warn_window_beyond_training(recipe)
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(recipe), run_dir / "recipe.yaml")
        (run_dir / "trainable.txt").write_text("\n".join(module.trainable_names) + "\n")
    trainer.fit(module, loader, ckpt_path=recipe.trainer.resume_from, weights_only=True)
    monitor = next(c for c in trainer.callbacks if isinstance(c, DataMonitor))
    if monitor.stop_reason:
        raise PandoraError(
            f"{monitor.stop_reason}. Wrote {monitor.stop_checkpoint}; list the corrupt samples with "
            f"`pandora-lightning shards verify {recipe.data.manifest}`, fix or drop them (or raise the limit), then "
            f"resume with trainer.resume_from=last"
        )
    if next(c for c in trainer.callbacks if isinstance(c, Requeue)).stopped:
        return Path(trainer.checkpoint_callback.last_model_path)
    # The model file: trained tensors + recipe + folder fingerprints (no optimizer state), what
    # generate, score, export and init_from read.
    final = run_dir / "checkpoints" / "final.safetensors"
    for average in (c for c in trainer.callbacks if isinstance(c, WeightEMA)):
        average.apply_to(module)  # the model file holds the average of the weights, not the last ones
    state = full_state_dict(module.model)  # gathered from the shards under fsdp2 (all ranks take part)
    if trainer.is_global_zero:
        write_model_file(final, module.model, dict(module.hparams), state)
    return final
