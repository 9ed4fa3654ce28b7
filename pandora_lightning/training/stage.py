"""The stages: one LightningModule base that both share (build, freeze, loss, optimiser), and the
align and instruct stages that differ only in name and in the text that steers the generator."""
from __future__ import annotations

import math
from fnmatch import fnmatchcase
from functools import partial
from typing import ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from pandora_lightning import __version__
from pandora_lightning.config import to_dict
from pandora_lightning.data.frames import to_model_range
from pandora_lightning.errors import PandoraError
from pandora_lightning.models.world_model import WorldModel
from pandora_lightning.training.model_file import check_fingerprints, check_saved_state, fingerprints, saved_keys
from pandora_lightning.training.precision import compute_dtype, reconcile_dtypes, training_attention
from pandora_lightning.training.parallel import configure as configure_parallel
from pandora_lightning.training.recipe import OptimConfig, TrainingRecipe, training_recipe_from_dict
from pandora_lightning.training.lora import add_lora
from pandora_lightning.training.materialize import LazyWeights
from pandora_lightning.training.trainable import frozen_children, set_trainable, trainable_table


class WorldModelStage(L.LightningModule):
    """Trains the WorldModel with the diffusion loss on (given frames, text) -> clip examples.

    Subclasses name the stage and say which text of a sample steers the generator.
    """

    stage: ClassVar[str]
    text_kind: ClassVar[str]  # "caption" or "action"

    def __init__(self, recipe: dict, vocabulary: list[str], meta: bool = False, lazy: bool = False):
        """`recipe`: a training recipe as plain containers; `vocabulary`: the tiny tokenizers' words
        (see `training.vocabulary`). Both are saved in every checkpoint. `meta`: every component
        from its config alone on the meta device (to count and plan; config-only folders do).
        `lazy`: pretrained weights on the meta device, read per rank after sharding (fsdp2's
        `parallel.meta_init`; see `training.materialize`), held in `lazy_weights`."""
        super().__init__()
        self.recipe: TrainingRecipe = training_recipe_from_dict(recipe)
        self.save_hyperparameters(
            {"recipe": to_dict(self.recipe), "stage": self.stage, "version": __version__, "vocabulary": list(vocabulary)}
        )
        precision = self.recipe.trainer.precision
        self.model = WorldModel(self.recipe.model, vocabulary, dtype=compute_dtype(precision), meta=meta,
                                precomputed=self.recipe.data.precomputed, lazy=lazy)
        self.lazy_weights = LazyWeights(self.model) if lazy else None
        refuse_trained_encoders(self.model, list(self.recipe.trainable))
        self.lora_layers = add_lora(self.model, self.recipe.lora)
        self.trainable_names = set_trainable(self.model, list(self.recipe.trainable))
        reconcile_dtypes(self.model, precision)
        self._frozen = frozen_children(self.model)
        # Checkpoints hold only what a folder does not provide (see on_save_checkpoint); the check
        # that a resume file holds all of it is on_load_checkpoint's.
        self.strict_loading = False

    @classmethod
    def from_recipe(cls, recipe: TrainingRecipe, vocabulary: list[str] | None = None, meta: bool = False,
                    lazy: bool = False) -> WorldModelStage:
        """`vocabulary` None: the recipe's vocabulary file, or its training texts' words (`fit` also
        takes it from the checkpoint a run resumes or starts from)."""
        if vocabulary is None:
            from pandora_lightning.training.vocabulary import resolve_vocabulary

            vocabulary = resolve_vocabulary(recipe, from_checkpoints=False)
        return cls(to_dict(recipe), vocabulary, meta, lazy)

    def train(self, mode: bool = True):
        # Lightning puts the whole module in train mode each epoch; frozen parts stay in eval.
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def configure_model(self) -> None:
        # Lightning calls this once the processes exist (FSDP2 needs the device mesh); only once per module.
        if not getattr(self, "_parallel_applied", False):
            configure_parallel(self, self.recipe.parallel, self.recipe.trainer.precision)
            self._parallel_applied = True

    def on_fit_start(self) -> None:
        rank_zero_info(f"[{self.stage}] trainable / frozen parameters:\n{trainable_table(self.model)}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {f"model.{k}" for k in saved_keys(self.model)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["fingerprints"] = fingerprints(self.model)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_fingerprints(checkpoint.get("fingerprints", {}), "resume checkpoint")
        if "state_dict" not in checkpoint:  # a sharded folder: its strategy loaded (and checked) the tensors
            return
        state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
        check_saved_state(self.model, state, "resume checkpoint")

    def diffusion_loss(self, frames: torch.Tensor | None, context: torch.Tensor, encoded: dict | None = None) -> torch.Tensor:
        """frames (B, T, 3, H, W) in [-1, 1], context (B, N, Dctx) -> MSE on the new frames.

        The generator family draws the noise level and forms its own target (epsilon, v, EDM, flow).
        `encoded`: the generator's precomputed inputs ({"latents": (B, T, ...), ...}) instead of encoding `frames`.
        """
        extra = {} if encoded is None else {"encoded": encoded}
        pred, target = self.model.generator(frames, context, **extra)
        return F.mse_loss(pred.float(), target.float())

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """batch["frames"] (B, T, 3, H, W) uint8, batch["text"] B strings (or B lists, one text per round of a
        multi-round window) -> {"loss": weighted total, "diffusion", "distill"}.

        From precomputed inputs (data.precomputed; one round a window) batch["encoded"] holds the frozen
        encoders' outputs ("vision" (B, Tc, gh, gw, Dv), "teacher" / "teacher_empty" (B, N, D), "gen.*")
        and "frames" is there only when the generator reads pixels."""
        cfg = self.recipe.loss
        encoded = batch.get("encoded")
        frames = to_model_range(batch["frames"], self.dtype) if "frames" in batch else None
        multi = isinstance(batch["text"][0], (list, tuple))
        texts = [list(t) if multi else [t] for t in batch["text"]]  # [B][R]
        teacher_texts = [list(t) if multi else [t] for t in batch.get("teacher_text", batch["text"])]
        drop = [[False] * len(texts[0]) for _ in texts]
        if self.training and cfg.text_dropout > 0:
            drop = (torch.rand(len(texts) * len(texts[0])) < cfg.text_dropout).view(len(texts), -1).tolist()
            texts = [["" if d else t for d, t in zip(ds, ts)] for ds, ts in zip(drop, texts)]
            teacher_texts = [["" if d else t for d, t in zip(ds, ts)] for ds, ts in zip(drop, teacher_texts)]
        adapter = teacher = None
        if cfg.context == "adapter" or cfg.distill_weight > 0:
            if multi:  # (B, R, N, D) -> (B * R, N, D), sample-major like the clips below
                adapter = self.model.round_contexts(frames, [list(r) for r in zip(*texts)]).flatten(0, 1)
            elif encoded is not None:
                adapter = self.model.context(None, [t[0] for t in texts], encoded["vision"])
            else:
                adapter = self.model.context(frames[:, : self.model.cond_frames], [t[0] for t in texts])
        if cfg.needs_teacher:
            if encoded is None:
                teacher = self.model.teacher_context([t for ts in teacher_texts for t in ts])
            else:  # the stored embeddings of the window's text and of the empty text (text dropout)
                empty = torch.tensor([d[0] for d in drop], device=encoded["teacher"].device).view(-1, 1, 1)
                teacher = torch.where(empty, encoded["teacher_empty"], encoded["teacher"]).float()
        context = adapter if cfg.context == "adapter" else teacher
        if multi:  # every round's clip: its given frames and its new frames
            f, n = self.model.new_frames, self.model.cond_frames
            frames = torch.stack([frames[:, r * f : r * f + n + f] for r in range(len(texts[0]))], 1)
            if self.training and self.model.cfg.generator.cond_draft > 0 and frames.shape[1] > 1:
                frames = self.drafted_given(frames, context.unflatten(0, frames.shape[:2]))
            frames = frames.flatten(0, 1)
        gen = None if encoded is None else {k.removeprefix("gen."): v for k, v in encoded.items() if k.startswith("gen.")}
        out = {"diffusion": self.diffusion_loss(frames, context, gen)}
        if cfg.distill_weight > 0:
            # The teacher is the target, never pulled towards the adapter.
            out["distill"] = F.mse_loss(adapter.float(), teacher.detach().float())
        out["loss"] = out["diffusion"] + cfg.distill_weight * out.get("distill", 0.0)
        return out

    def drafted_given(self, clips: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """clips (B, R, T, 3, H, W) of a multi-round window, context (B, R, N, D) -> the clips with the given frames
        of a `generator.cond_draft` share of rounds 2..R replaced by the end of the generator's draft of the
        round before (no gradient): what a rollout hands on, not the real frames. The LLM still reads the real ones."""
        gen, n = self.model.generator, self.model.cond_frames
        if not hasattr(gen, "draft"):  # a pretrained family: the key is the tiny generator's (see GeneratorConfig)
            return clips
        b, r = clips.shape[:2]
        drafts = gen.draft(clips[:, :-1].flatten(0, 1), context[:, :-1].flatten(0, 1).detach()).unflatten(0, (b, r - 1))
        chosen = (torch.rand(b, r - 1, device=clips.device) < gen.cfg.cond_draft).view(b, r - 1, 1, 1, 1, 1)
        given = torch.where(chosen, drafts[:, :, -n:].to(clips.dtype), clips[:, 1:, :n])
        return torch.cat([clips[:, :1], torch.cat([given, clips[:, 1:, n:]], dim=2)], dim=1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        with training_attention(self.trainer.precision, self.device):
            parts = self.losses(batch)
        for name, value in parts.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=len(batch["text"]))
        return parts["loss"]

    def configure_optimizers(self):
        cfg = self.recipe.optim
        params = [p for p in self.parameters() if p.requires_grad]
        # On CPU PyTorch's default AdamW loops over the tensors one by one (24 ms a step for the tiny
        # model's 305 tensors at 2 threads, 12% of an instruct step); its fused kernel takes a third of
        # that. GPUs keep PyTorch's default (foreach), and fp16 its gradient scaler, which a fused
        # optimizer would unscale inside its step, after the clipping below.
        fused = bool(params) and all(p.device.type == "cpu" for p in params) and self.recipe.trainer.precision != "16-mixed"
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg, self.recipe.trainer.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Lightning's mixed-precision plugin refuses to clip for any fused optimizer, since fp16's
        # scaler is unscaled inside a fused step; bf16 has no scaler, so its gradients are clipped here,
        # as Lightning's own plugin clips them.
        if not optimizer.defaults.get("fused") or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)


def lr_factor(cfg: OptimConfig, max_steps: int, step: int) -> float:
    """The learning rate of `step` as a share of optim.lr: a linear warmup, then constant or a cosine decay."""
    warmup = max(1, cfg.warmup_steps)
    if step < warmup or cfg.schedule == "constant":
        return min(1.0, (step + 1) / warmup)
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class AlignStage(WorldModelStage):
    """Stage 1, pretraining alignment: caption-steered generation aligns the LLM side with the generator."""

    stage = "align"
    text_kind = "caption"


class InstructStage(WorldModelStage):
    """Stage 2, instruction tuning: (state clip, action text) -> next clip, from the align checkpoint."""

    stage = "instruct"
    text_kind = "action"


class AdaptStage(WorldModelStage):
    """LoRA domain adaptation: only the peft adapter `lora.name` trains, on a new domain's shards, on
    top of an instruct checkpoint whose own LoRA is merged into its weights (see `training.adapt`).
    At the end of fit the adapter is written in peft's format to <run_dir>/adapter."""

    stage = "adapt"
    text_kind = "action"

    def __init__(self, recipe: dict, vocabulary: list[str], meta: bool = False, lazy: bool = False):
        super().__init__(recipe, vocabulary, meta, lazy)
        name = self.recipe.lora.name
        other = [n for n in self.trainable_names if f".lora_A.{name}." not in n and f".lora_B.{name}." not in n]
        if other:
            raise PandoraError(
                f"stage adapt trains the adapter '{name}' only, but `trainable` also selects {other[:3]}"
                f"{'...' if len(other) > 3 else ''}; use trainable: ['*lora_*']"
            )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        total = sum(p.numel() for p in self.model.parameters())
        on = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        layers = ", ".join(f"{c} {len(names)} layers" for c, names in self.lora_layers.items())
        rank_zero_info(f"[adapt] adapter '{self.recipe.lora.name}': {on:,} of {total:,} parameters train "
                       f"({100 * on / total:.2f}%); LoRA on {layers}")

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            from pandora_lightning.training.adapters import save_adapter

            out = save_adapter(self.model, self.recipe.lora.name, f"{self.recipe.run_dir}/adapter", self.recipe.init_from,
                               to_dict(self.recipe))
            rank_zero_info(f"[adapt] adapter '{self.recipe.lora.name}' written to {out}")


def refuse_trained_encoders(model: WorldModel, patterns: list[str]) -> None:
    """Precomputed inputs replace the frozen encoders by their stored outputs: a recipe that trains one is refused."""
    trained = [(n, p) for n in model.frozen_input_names for p in patterns if fnmatchcase(n, p)]
    if trained:
        name, pattern = trained[0]
        raise PandoraError(
            f"data.precomputed: the recipe trains {name.split('.')[0] if not name.startswith('generator.') else '.'.join(name.split('.')[:2])} "
            f"(trainable pattern '{pattern}'), but precomputed inputs replace that encoder by its stored outputs; "
            f"remove it from `trainable` or set data.precomputed=false"
        )


STAGES: dict[str, type[WorldModelStage]] = {cls.stage: cls for cls in (AlignStage, InstructStage, AdaptStage)}
