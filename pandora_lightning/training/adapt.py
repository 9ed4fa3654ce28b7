"""The adapt stage's base: the model comes from the instruct checkpoint it starts from, with that
checkpoint's own LoRA folded into the weights, so that the new adapter sits on plain layers (what
peft's `PeftModel.from_pretrained` expects of a base component)."""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from pandora_lightning.errors import PandoraError
from pandora_lightning.models.world_model import WorldModelConfig
from pandora_lightning.training.checkpoint import load_checkpoint_file, load_stage, load_state_into
from pandora_lightning.training.lora import merge_lora
from pandora_lightning.training.model_file import check_file_fingerprint, file_fingerprint
from pandora_lightning.training.recipe import TrainingRecipe, training_recipe_from_dict
from pandora_lightning.training.stage import WorldModelStage


def _first_difference(a: dict, b: dict, prefix: str = "model") -> str | None:
    for key in a:
        if isinstance(a[key], dict) and isinstance(b.get(key), dict):
            found = _first_difference(a[key], b[key], f"{prefix}.{key}")
            if found:
                return found
        elif a[key] != b.get(key):
            return f"{prefix}.{key}={a[key]!r} (the base has {b.get(key)!r})"
    return None


def with_base_model(recipe: TrainingRecipe) -> TrainingRecipe:
    """The adapt recipe with the base checkpoint's model block (a `model` block of its own must agree)."""
    ckpt = load_checkpoint_file(recipe.init_from)
    stage = ckpt["hyper_parameters"].get("stage")
    if stage == "adapt":
        raise PandoraError(
            f"init_from '{recipe.init_from}' is an adapt checkpoint; adapt starts from an instruct (or align) checkpoint "
            f"and its adapters are loaded side by side at generate/score time (--adapter)"
        )
    base = training_recipe_from_dict(ckpt["hyper_parameters"]["recipe"]).model
    if recipe.model != WorldModelConfig() and recipe.model != base:
        diff = _first_difference(asdict(recipe.model), asdict(base))
        raise PandoraError(f"the adapt recipe's model differs from its base checkpoint's: {diff}; leave `model` out of it")
    return replace(recipe, model=base)


def merged_base(path: str | Path) -> WorldModelStage:
    """The stage of checkpoint `path` with its LoRA merged into the weights: an adapter's base."""
    module = load_stage(path)
    merge_lora(module.model)
    return module


def init_adapt_from(module: WorldModelStage, path: str | Path, saved: dict | None = None) -> None:
    """The base checkpoint's weights (its own LoRA merged) under the adapter: at the start of an adapt run
    (the base's fingerprint goes into the run's checkpoints), and when an adapt checkpoint is loaded,
    because weights that a pretrained folder provides (an LLM with the base's LoRA merged, a UNet the
    base trained) are in no adapt checkpoint. `saved`: the fingerprint to check the base against."""
    if saved is not None:
        # The recipe's path as given (it may be relative to where fit ran), else where it was then.
        found = path if Path(path).expanduser().is_file() else saved["path"]
        check_file_fingerprint(saved, found, f"adapt checkpoint of adapter '{module.recipe.lora.name}'")
        path = found
    base = merged_base(path)
    load_state_into(module, base.model.state_dict(), f"checkpoint '{path}' (stage {base.stage})")
    module.hparams["base_checkpoint"] = saved or file_fingerprint(path)
