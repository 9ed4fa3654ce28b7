"""Checkpoints of the stages: read one safely, rebuild the stage it came from, or start from its weights."""
from __future__ import annotations

from pathlib import Path

import torch

from pandora_lightning import __version__
from pandora_lightning.errors import PandoraError
from pandora_lightning.training.stage import STAGES, WorldModelStage


def load_checkpoint_file(path: str | Path) -> dict:
    """Read a pandora-lightning checkpoint, or raise an error that names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise PandoraError(f"checkpoint '{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise PandoraError(f"checkpoint '{path}' cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "recipe" not in ckpt.get("hyper_parameters", {}):
        raise PandoraError(f"checkpoint '{path}' is not a pandora-lightning stage checkpoint (no recipe inside)")
    return ckpt


def load_stage(path: str | Path) -> WorldModelStage:
    """Rebuild the stage module a checkpoint was trained with and load its weights (on CPU, eval mode)."""
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
    module = STAGES[meta["stage"]](meta["recipe"], stored_vocabulary(ckpt, path))
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise PandoraError(f"checkpoint '{path}' does not match its own recipe's model: {str(err).splitlines()[0]}") from None
    return module.eval()


def stored_vocabulary(ckpt: dict, path: str | Path) -> list[str]:
    """The tiny tokenizers' words saved with a checkpoint."""
    vocabulary = ckpt["hyper_parameters"].get("vocabulary")
    if vocabulary is None:
        raise PandoraError(f"checkpoint '{path}' holds no vocabulary (written before 0.2); retrain it with this version")
    return list(vocabulary)


def init_from(module: WorldModelStage, path: str | Path) -> None:
    """Start `module` from another checkpoint's model weights (instruct <- align); LoRA layers may be new."""
    ckpt = load_checkpoint_file(path)
    state = {key.removeprefix("model."): value for key, value in ckpt["state_dict"].items()}
    load_state_into(module, state, f"checkpoint '{path}' (stage {ckpt['hyper_parameters'].get('stage')})")


def load_state_into(module: WorldModelStage, state: dict, what: str) -> None:
    """Load WorldModel weights `state` into `module.model`; its LoRA layers (absent from `state`) stay as built."""
    own = set(module.model.state_dict())
    mapped = {}
    for key, value in state.items():
        # peft moves a wrapped layer's weights under .base_layer
        head, _, leaf = key.rpartition(".")
        lora_key = f"{head}.base_layer.{leaf}"
        mapped[lora_key if key not in own and lora_key in own else key] = value
    missing, unexpected = module.model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if "lora_" not in k]
    if missing or unexpected:
        raise PandoraError(
            f"{what} does not match this recipe's model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
