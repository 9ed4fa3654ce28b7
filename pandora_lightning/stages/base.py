"""The one LightningModule base that both stages share: build, freeze, loss, optimiser, checkpoints."""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from pandora_lightning import __version__
from pandora_lightning.config import ConfigError, RecipeConfig, recipe_from_dict, recipe_to_dict
from pandora_lightning.models.world_model import WorldModel
from pandora_lightning.stages.trainable import add_lora, frozen_children, set_trainable, trainable_table
from pandora_lightning.world.corpus import world_corpus


def load_checkpoint_file(path: str | Path) -> dict:
    """Read a pandora-lightning checkpoint, or raise an error that names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint '{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise ConfigError(f"checkpoint '{path}' cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "recipe" not in ckpt.get("hyper_parameters", {}):
        raise ConfigError(f"checkpoint '{path}' is not a pandora-lightning stage checkpoint (no recipe inside)")
    return ckpt


class WorldModelStage(L.LightningModule):
    """Trains the WorldModel with the diffusion loss on (given frames, text) -> clip examples.

    Subclasses name the stage and say which text of a sample steers the generator.
    """

    stage: ClassVar[str]
    text_kind: ClassVar[str]  # "caption" or "action"

    def __init__(self, recipe: dict):
        super().__init__()
        self.save_hyperparameters({"recipe": recipe, "stage": self.stage, "version": __version__})
        self.recipe: RecipeConfig = recipe_from_dict(recipe)
        self.model = WorldModel(self.recipe.model, tiny_corpus=world_corpus())
        if self.recipe.lora.rank > 0:
            add_lora(self.model.llm.model, self.recipe.lora)
        self.trainable_names = set_trainable(self.model, list(self.recipe.trainable))
        self._frozen = frozen_children(self.model)

    @classmethod
    def from_recipe(cls, recipe: RecipeConfig) -> WorldModelStage:
        return cls(recipe_to_dict(recipe))

    def train(self, mode: bool = True):
        # Lightning puts the whole module in train mode each epoch; frozen parts stay in eval.
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def on_fit_start(self) -> None:
        rank_zero_info(f"[{self.stage}] trainable / frozen parameters:\n{trainable_table(self.model)}")

    def init_from(self, path: str | Path) -> None:
        """Start from another checkpoint's model weights (instruct <- align); LoRA layers may be new."""
        ckpt = load_checkpoint_file(path)
        own = set(self.model.state_dict())
        state = {}
        for key, value in ckpt["state_dict"].items():
            key = key.removeprefix("model.")
            # peft moves a wrapped layer's weights under .base_layer
            head, _, leaf = key.rpartition(".")
            lora_key = f"{head}.base_layer.{leaf}"
            state[lora_key if key not in own and lora_key in own else key] = value
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if "lora_" not in k]
        if missing or unexpected:
            raise ConfigError(
                f"checkpoint '{path}' (stage {ckpt['hyper_parameters'].get('stage')}) does not match this recipe's "
                f"model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
            )

    def diffusion_loss(self, frames: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """frames (B, T, 3, H, W) in [-1, 1], context (B, N, Dctx) -> MSE on the new frames."""
        n = self.model.cond_frames
        generator = self.model.generator
        x0, cond = generator.prepare(frames)
        noise = torch.randn_like(x0)
        steps = generator.train_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (x0.shape[0],), device=x0.device)
        pred = generator.denoise(generator.add_noise(x0, noise, t), t, cond, context)
        target = generator.training_target(x0, noise, t)
        return F.mse_loss(pred[:, n:].float(), target[:, n:].float())

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """batch["frames"] (B, T, 3, H, W) uint8, batch["text"] B strings -> {"loss": weighted total, "diffusion", "distill"}."""
        cfg = self.recipe.loss
        frames = batch["frames"].to(self.dtype) / 127.5 - 1
        texts = list(batch["text"])
        if self.training and cfg.text_dropout > 0:
            drop = torch.rand(len(texts)) < cfg.text_dropout
            texts = ["" if d else text for d, text in zip(drop.tolist(), texts)]
        adapter = teacher = None
        if cfg.context == "adapter" or cfg.distill_weight > 0:
            adapter = self.model.context(frames[:, : self.model.cond_frames], texts)
        if cfg.needs_teacher:
            teacher = self.model.teacher_context(texts)
        out = {"diffusion": self.diffusion_loss(frames, adapter if cfg.context == "adapter" else teacher)}
        if cfg.distill_weight > 0:
            # The teacher is the target, never pulled towards the adapter.
            out["distill"] = F.mse_loss(adapter.float(), teacher.detach().float())
        out["loss"] = out["diffusion"] + cfg.distill_weight * out.get("distill", 0.0)
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        parts = self.losses(batch)
        for name, value in parts.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=batch["frames"].shape[0])
        return parts["loss"]

    def configure_optimizers(self):
        cfg = self.recipe.optim
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(1, cfg.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
