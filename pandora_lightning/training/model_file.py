"""What a checkpoint holds: the tensors that training produced, never a weight a pretrained folder provides.

A pretrained folder (the LLM, the vision tower, the UNet, the VAE, the text encoder) is recorded by
its fingerprint instead (path, every file's size, a hash of its JSON configs); loading rebuilds the
model from the folders, checks the fingerprints and adds the saved tensors. The same selection is
used by Lightning's resume checkpoints (plus optimizer state) and by the model file
`checkpoints/final.safetensors`: safetensors tensors + the recipe, vocabulary and fingerprints as
JSON in its header. Nothing here unpickles.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pandora_lightning.errors import PandoraError
from pandora_lightning.models.loading import check_fingerprint, fingerprint

MODEL_FILE_FORMAT = "pandora-lightning/model/1"


def saved_keys(model: nn.Module) -> list[str]:
    """WorldModel state-dict keys a checkpoint keeps: everything except the frozen tensors a folder provides."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    dropped = model.provided_keys() - trainable
    return [k for k in model.state_dict(keep_vars=True) if k not in dropped]


def fingerprints(model: nn.Module) -> dict[str, dict]:
    """Module name -> fingerprint of the folder its weights were read from."""
    return {name: fingerprint(folder) for name, folder in model.pretrained_modules().items()}


def check_fingerprints(saved: dict[str, dict], what: str) -> None:
    """Every pretrained folder a checkpoint was trained on must be there, unchanged (one line if not)."""
    for name, print_ in saved.items():
        check_fingerprint(print_, print_["path"], f"{what}: {name}")


def file_fingerprint(path: str | Path, chunks: int = 64) -> dict:
    """What an adapt checkpoint remembers of the checkpoint it started from: the resolved path, the size and
    a hash of `chunks` 64 KiB pieces spread over the file (all of a small file; cheap for a large one)."""
    path = Path(path).expanduser().resolve()
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for offset in range(0, size, max(1, -(-size // chunks))):
            f.seek(offset)
            digest.update(f.read(1 << 16))
    return {"path": str(path), "size": size, "sha256_sampled": digest.hexdigest()}


def check_file_fingerprint(saved: dict, path: str | Path, what: str) -> None:
    """The base checkpoint must be there, unchanged since `saved` was taken (one line if not)."""
    if not Path(path).expanduser().is_file():
        raise PandoraError(f"{what}: its base checkpoint '{path}' does not exist (an adapt checkpoint is rebuilt on the "
                           f"checkpoint it started from; it was '{saved['path']}')")
    now = file_fingerprint(path)
    if (now["size"], now["sha256_sampled"]) != (saved["size"], saved["sha256_sampled"]):
        raise PandoraError(f"{what}: its base checkpoint '{path}' changed since the adapter was trained on it "
                           f"({now['size']} bytes, was {saved['size']}; contents differ)")


def check_saved_state(model: nn.Module, state: dict, what: str, start: bool = False) -> None:
    """`state` (WorldModel names) must hold exactly what a checkpoint of `model` keeps. `start`: a run
    starting from another stage's checkpoint may add LoRA layers and train tensors that stage left
    frozen (their folder provides them)."""
    want = set(saved_keys(model))
    optional = model.provided_keys() if start else set()
    missing = sorted(k for k in want - set(state) if not (start and ("lora_" in k or k in optional)))
    unexpected = sorted(set(state) - set(model.state_dict(keep_vars=True)))
    if missing or unexpected:
        provided = model.provided_keys()
        hint = (" (tensors a pretrained folder provides are not in checkpoints: set the same `pretrained` folders "
                "and model.weights as the run that wrote it)") if set(missing) & provided or set(unexpected) else ""
        raise PandoraError(
            f"{what} does not match this recipe's model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}{hint}"
        )


def _detached(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; tensors that share storage (tied weights) are copied apart, as safetensors needs."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        out[key] = value.clone() if ident in seen else value
        seen.add(ident)
    return out


def write_model_file(path: str | Path, model: nn.Module, hyper_parameters: dict, state: dict | None = None) -> Path:
    """The trained tensors of `model` (a WorldModel) + `hyper_parameters` (recipe, stage, version,
    vocabulary) + the fingerprints of its pretrained folders, as one safetensors file. `state`: the
    model's full state dict when it is sharded (gathered by `parallel.full_state_dict`)."""
    full = model.state_dict() if state is None else state
    # Trained from precomputed inputs: the random / earlier-trained encoders left out of the model go in
    # the file too, so that it is a whole model for generate and score.
    kept = {k: full[k] for k in saved_keys(model)} | dict(getattr(model, "frozen_input_state", {}))
    return write_state_file(path, kept, hyper_parameters, fingerprints(model))


def write_state_file(path: str | Path, state: dict[str, torch.Tensor], hyper_parameters: dict, prints: dict) -> Path:
    """`state` (WorldModel names) + hyper-parameters + folder fingerprints -> a model file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": MODEL_FILE_FORMAT,
        "hyper_parameters": json.dumps(hyper_parameters),
        "fingerprints": json.dumps(prints),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(_detached(state), str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def model_file_header(path: Path) -> dict:
    """A model file's recipe and fingerprints, its tensors left unread: {"hyper_parameters", "fingerprints"}."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception as err:  # a damaged header or truncated file
        raise PandoraError(f"checkpoint '{path}' cannot be read ({type(err).__name__}: {err})") from None
    if meta.get("format") != MODEL_FILE_FORMAT:
        raise PandoraError(
            f"checkpoint '{path}' is a safetensors file but not a pandora-lightning model file "
            f"(format '{meta.get('format')}', expected '{MODEL_FILE_FORMAT}')"
        )
    return {"hyper_parameters": json.loads(meta["hyper_parameters"]), "fingerprints": json.loads(meta.get("fingerprints", "{}"))}


def read_model_file(path: Path) -> dict:
    """A model file as a checkpoint dict: {"state_dict": {"model.<name>": tensor}, "hyper_parameters", "fingerprints"}."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != MODEL_FILE_FORMAT:
                raise PandoraError(
                    f"checkpoint '{path}' is a safetensors file but not a pandora-lightning model file "
                    f"(format '{meta.get('format')}', expected '{MODEL_FILE_FORMAT}')"
                )
            state = {f"model.{k}": f.get_tensor(k) for k in f.keys()}
        return {
            "state_dict": state,
            "hyper_parameters": json.loads(meta["hyper_parameters"]),
            "fingerprints": json.loads(meta.get("fingerprints", "{}")),
        }
    except PandoraError:
        raise
    except Exception as err:  # a damaged header or truncated file
        raise PandoraError(f"checkpoint '{path}' cannot be read ({type(err).__name__}: {err})") from None
