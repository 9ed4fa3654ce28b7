"""Checkpoints of the stages: read one safely, rebuild the stage it came from, or start from its weights.

Two kinds of file, both holding only what training produced (see `training.model_file`): Lightning's
resume checkpoints (`last.ckpt`, ...: + optimizer, loop and data state), read with
`torch.load(weights_only=True)`, and the model file `final.safetensors`. A pickle that would build
any object other than tensors and plain containers is refused, never run.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from pandora_lightning import __version__
from pandora_lightning.errors import PandoraError
from pandora_lightning.training.materialize import init_from_source
from pandora_lightning.training.model_file import check_fingerprints, check_saved_state, model_file_header, read_model_file
from pandora_lightning.training.precision import check_precision, reconcile_dtypes
from pandora_lightning.training.sharded import read_sharded
from pandora_lightning.training.stage import STAGES, WorldModelStage


def load_checkpoint_file(path: str | Path) -> dict:
    """A checkpoint (a file, or a sharded folder written under fsdp2) as {"state_dict", "hyper_parameters",
    "fingerprints", ...}, or one line naming the problem."""
    path = Path(path)
    if path.is_dir():
        ckpt = read_sharded(path)
    elif not path.is_file():
        raise PandoraError(f"checkpoint '{path}' does not exist")
    elif path.suffix == ".safetensors":
        return read_model_file(path)
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            refused = str(err).split("GLOBAL ", 1)[-1].split(" ", 1)[0] if "GLOBAL" in str(err) else "pickle code"
            raise PandoraError(
                f"checkpoint '{path}' holds Python objects besides tensors and plain containers ({refused}); it is "
                f"refused because unpickling it could run code. Only load files you trust, and convert them to safetensors"
            ) from None
        except Exception as err:  # torch raises many types for a damaged file
            raise PandoraError(f"checkpoint '{path}' cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "recipe" not in ckpt.get("hyper_parameters", {}):
        raise PandoraError(f"checkpoint '{path}' is not a pandora-lightning stage checkpoint (no recipe inside)")
    ckpt.setdefault("fingerprints", {})
    return ckpt


def load_stage(path: str | Path, device: str | torch.device = "cpu", precision: str | None = None) -> WorldModelStage:
    """Rebuild the stage module a checkpoint was trained with, from its recipe's pretrained folders
    (checked against their fingerprints) plus the checkpoint's tensors; on `device`, in `precision`
    (default: the recipe's `trainer.precision`), eval mode."""
    ckpt = load_checkpoint_file(path)
    meta = ckpt["hyper_parameters"]
    if meta.get("stage") not in STAGES:
        raise PandoraError(f"checkpoint '{path}' is from an unknown stage '{meta.get('stage')}'; known: {sorted(STAGES)}")
    version = str(meta.get("version"))
    # Before 1.0 a minor release may change the model layout: major.minor must match.
    if version.split(".")[:2] != __version__.split(".")[:2]:
        raise PandoraError(
            f"checkpoint '{path}' was written by pandora-lightning {version}; this is {__version__}, which reads "
            f"checkpoints of {'.'.join(__version__.split('.')[:2])}.x only"
        )
    check_fingerprints(ckpt["fingerprints"], f"checkpoint '{path}'")
    recipe = dict(meta["recipe"])
    # A model trained from precomputed inputs runs on frames: rebuild it with its encoders.
    recipe["data"] = {**recipe.get("data", {}), "precomputed": False}
    if precision is not None:
        recipe["trainer"] = {**recipe.get("trainer", {}), "precision": check_precision(precision)}
    module = STAGES[meta["stage"]](recipe, stored_vocabulary(ckpt, path))
    if module.stage == "adapt":
        # Its base (the checkpoint it started from, that one's LoRA merged) comes from there: a folder
        # provides those weights, so no adapt checkpoint holds them. (adapt.py builds on this module.)
        from pandora_lightning.training.adapt import init_adapt_from

        init_adapt_from(module, module.recipe.init_from, meta.get("base_checkpoint"))
    state = {key.removeprefix("model."): value for key, value in ckpt["state_dict"].items()}
    check_saved_state(module.model, state, f"checkpoint '{path}'")
    module.model.load_state_dict(state, strict=False)
    reconcile_dtypes(module.model, module.recipe.trainer.precision)
    module.model.precision = module.recipe.trainer.precision  # what rollouts outside a Trainer autocast to
    return module.to(device).eval()


def stored_vocabulary(ckpt: dict, path: str | Path) -> list[str]:
    """The tiny tokenizers' words saved with a checkpoint."""
    vocabulary = ckpt["hyper_parameters"].get("vocabulary")
    if vocabulary is None:
        raise PandoraError(f"checkpoint '{path}' holds no vocabulary (written before 0.2); retrain it with this version")
    return list(vocabulary)


def init_from(module: WorldModelStage, path: str | Path) -> None:
    """Start `module` from another checkpoint's model weights (instruct <- align); LoRA layers may be new.
    A lazily built module (`parallel.meta_init`) only records the file: each rank reads its shards later."""
    if module.lazy_weights is not None and Path(path).suffix == ".safetensors" and Path(path).is_file():
        return lazy_init_from(module, path)
    ckpt = load_checkpoint_file(path)
    check_fingerprints(ckpt["fingerprints"], f"checkpoint '{path}'")
    state = {key.removeprefix("model."): value for key, value in ckpt["state_dict"].items()}
    what = f"checkpoint '{path}' (stage {ckpt['hyper_parameters'].get('stage')})"
    if module.lazy_weights is not None:  # a resume file or sharded folder: trained tensors only, already in memory
        keys = state_keys_into(module, state, what)
        module.lazy_weights.set_init_from(init_from_source(path, state), keys)
        return
    load_state_into(module, state, what)


def lazy_init_from(module: WorldModelStage, path: str | Path) -> None:
    """`init_from` for a lazily built module: a model file's header is read and checked now, its tensors later."""
    header = model_file_header(Path(path))
    check_fingerprints(header["fingerprints"], f"checkpoint '{path}'")
    source = init_from_source(path, None)
    what = f"checkpoint '{path}' (stage {header['hyper_parameters'].get('stage')})"
    keys = state_keys_into(module, {k: None for k in source.keys()}, what, read=source.read)
    module.lazy_weights.set_init_from(source, keys)


def state_keys_into(module: WorldModelStage, state: dict, what: str, read=None) -> dict[str, str]:
    """Which of `module.model`'s tensors `state`'s keys load into: {model name: key in `state`}, checked as
    `load_state_into` checks them. Encoders that precomputed inputs replace are kept aside at once
    (their values from `state`, or from `read(key)`)."""
    own = set(module.model.state_dict())
    mapped = {}
    left_out = tuple(f"{name}." for name in module.model.frozen_inputs()) if module.model.precomputed else ()
    for key, value in state.items():
        if left_out and key.startswith(left_out):  # an encoder precomputed inputs replace: kept aside, not loaded
            if key in module.model.frozen_input_state:
                value = read(key) if value is None else value
                module.model.frozen_input_state[key] = value.detach().to(module.model.frozen_input_state[key].dtype)
            continue
        # peft moves a wrapped layer's weights under .base_layer
        head, _, leaf = key.rpartition(".")
        lora_key = f"{head}.base_layer.{leaf}"
        mapped[lora_key if key not in own and lora_key in own else key] = key
    check_saved_state(module.model, mapped, what, start=True)
    return mapped


def load_state_into(module: WorldModelStage, state: dict, what: str) -> None:
    """Load WorldModel weights `state` into `module.model`; its LoRA layers (absent from `state`) stay as built.

    `state` may hold every tensor or only what a checkpoint keeps (the rest comes from the folders)."""
    keys = state_keys_into(module, state, what)
    module.model.load_state_dict({name: state[key] for name, key in keys.items()}, strict=False)
    reconcile_dtypes(module.model, module.recipe.trainer.precision)
