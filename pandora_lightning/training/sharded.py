"""Sharded checkpoints: torch.distributed.checkpoint (DCP) folders written by `parallel.strategy=fsdp2`.

A folder `<name>.ckpt/` holds `.metadata`, one `__<rank>_0.distcp` file per rank that wrote it, and
`meta.pt` (Lightning's loops, the data-loader positions and random states of every rank, the
recipe). The tensors are the trainable parameters (`state_dict.model.<name>`) and the optimizer
state (`optimizer_0...`), addressed by name, so DCP can read them back on any number of ranks.
`read_sharded` reads a folder in one process without a process group (what `consolidate`, `score`,
`generate` and `init_from` use). The tensors are those `model_file.saved_keys` names: what trained,
never a weight a pretrained folder provides.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pandora_lightning.errors import PandoraError

METADATA = "meta.pt"


def is_sharded(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / METADATA).is_file() and (path / ".metadata").is_file()


def check_resume_form(run_dir: Path, resume_from: str | None, fsdp2: bool) -> None:
    """A sharded folder resumes only under fsdp2 (on any number of ranks: DCP reshards), a single file
    only without it; else one line naming the fix."""
    if not resume_from:
        return
    path = run_dir / "checkpoints" / "last.ckpt" if resume_from == "last" else Path(resume_from)
    if is_sharded(path) and not fsdp2:
        raise PandoraError(
            f"trainer.resume_from: '{path}' is a sharded (parallel.strategy=fsdp2) checkpoint folder; resume it with "
            f"parallel.strategy=fsdp2 on 2 or more processes (any number: the shards are redistributed), or start "
            f"from its weights with init_from={path}"
        )
    if path.is_file() and fsdp2:
        raise PandoraError(
            f"trainer.resume_from: '{path}' is a single-file checkpoint, but parallel.strategy=fsdp2 resumes from the "
            f"folders it writes; start from its weights with init_from={path}, or resume without fsdp2"
        )


def _check_folder(path: Path) -> None:
    if path.is_dir() and not is_sharded(path):
        raise PandoraError(
            f"checkpoint folder '{path}' is not a sharded checkpoint (it needs .metadata and {METADATA}, "
            f"written by a parallel.strategy=fsdp2 run)"
        )


def read_sharded(path: str | Path) -> dict:
    """A sharded checkpoint folder -> {"state_dict": {name: full tensor}, **meta.pt} in this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    _check_folder(path)
    try:
        stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        meta = torch.load(path / METADATA, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged metadata: torch raises many types
        raise PandoraError(f"checkpoint '{path}' cannot be read ({type(err).__name__}: {err})") from None
    state = {}
    for key, item in stored.items():
        if key.startswith("state_dict.") and isinstance(item, TensorStorageMetadata):
            state[key.removeprefix("state_dict.")] = torch.empty(item.size, dtype=item.properties.dtype)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"state_dict": state}, checkpoint_id=str(path), no_dist=True)
    return {**meta, "state_dict": state}


def load_sharded_into(path: Path, model: torch.nn.Module, optimizers: list, keys: set[str]) -> dict:
    """Inside a running fsdp2 job: read this rank's part of the trainable tensors and optimizer state
    (resharded by DCP when the folder was written by another number of ranks); returns meta.pt."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if not is_sharded(path):
        raise PandoraError(
            f"trainer.resume_from='{path}' is not a sharded checkpoint folder; a parallel.strategy=fsdp2 run resumes "
            f"from the folders it writes (checkpoints/last.ckpt/); to start from a single-file checkpoint's weights "
            f"use init_from"
        )
    model_state = {k: v for k, v in get_model_state_dict(model).items() if k in keys}
    stored = _stored_keys(path)
    missing = sorted(k for k in model_state if f"state_dict.{k}" not in stored)
    if missing:
        raise PandoraError(
            f"checkpoint '{path}' does not hold {len(missing)} trainable tensor(s) of this recipe, e.g. {missing[:2]}: "
            f"it was written with another trainable set or model"
        )
    dcp.load({"state_dict": model_state}, checkpoint_id=str(path))
    set_model_state_dict(model, model_state, options=StateDictOptions(strict=False))
    for i, optimizer in enumerate(optimizers):
        key = f"optimizer_{i}"
        state = {key: get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=str(path))
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state[key])
    return torch.load(path / METADATA, map_location="cpu", weights_only=True)


def _stored_keys(path: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def consolidate(path: str | Path, out: str | Path | None = None) -> Path:
    """A sharded checkpoint folder -> the model file (`model_file.py`: trained tensors + recipe +
    folder fingerprints as safetensors, no optimizer or loop state), what `score`, `generate`,
    `export` and `init_from` read: `<name>.safetensors` beside the folder by default."""
    from pandora_lightning.training.model_file import write_state_file

    path = Path(path)
    if not is_sharded(path):
        raise PandoraError(f"consolidate: '{path}' is not a sharded checkpoint folder (written by parallel.strategy=fsdp2)")
    ckpt = read_sharded(path)
    out = Path(out) if out else path.with_suffix(".safetensors")
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    return write_state_file(out, state, ckpt["hyper_parameters"], ckpt.get("fingerprints", {}))
