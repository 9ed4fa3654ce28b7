"""Reading pretrained components from local folders: checks, config-only builds, fingerprints.

Nothing is ever fetched from a hub. A folder either holds weights (loaded in the dtype asked for)
or only its config (built with random weights, on the meta device when asked: enough to count,
plan and benchmark a real-size model before downloading it).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pandora_lightning.errors import PandoraError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class LoadOptions:
    """How components are built from their folders.

    weights: read the folders' weights (False: config only, random init);
    meta: build on the meta device (no memory, nothing read but configs; implies weights=False);
    dtype: the dtype weights are loaded in (the compute dtype of frozen parts);
    lazy: components whose folder holds weights get their parameters on the meta device and their
    buffers computed as usual; the weights are read later, each rank only its shard of every tensor
    (see `models.weight_files` and `training.materialize`). Everything else is built as usual.
    """

    weights: bool = True
    meta: bool = False
    dtype: torch.dtype = torch.float32
    lazy: bool = False

    @property
    def read_weights(self) -> bool:
        return self.weights and not self.meta

    @property
    def init(self) -> str:
        """The generator families' name for it: weights | random | meta."""
        return "meta" if self.meta else "random" if not self.weights else "lazy" if self.lazy else "weights"

    def device(self):
        """Context in which modules are constructed."""
        return torch.device("meta") if self.meta else contextlib.nullcontext()


def build_empty(build, undo_draws: bool = True, default_dtype: torch.dtype | None = None):
    """`build()` as a pretrained component is built for lazy loading: parameters on the meta device
    (no memory), buffers computed on the CPU as its constructor computes them. What is built after it
    must draw the same random numbers as in a build that loads it, so its random draws are those its
    library's from_pretrained makes: none for transformers (`undo_draws`: undone), the constructor's
    own for diffusers (which builds under the same empty-weights context, in `default_dtype`).
    Shared (tied) weights are tied again, as building with empty weights makes each parameter anew."""
    from accelerate import init_empty_weights

    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[], enabled=undo_draws), init_empty_weights(include_buffers=False):
        if default_dtype is not None:
            torch.set_default_dtype(default_dtype)
        try:
            model = build()
        finally:
            torch.set_default_dtype(previous)
    if callable(getattr(model, "tie_weights", None)):  # transformers models (lm_head = embed_tokens, ...)
        model.tie_weights()
    return model


def local_dir(path: str, what: str, must_contain: str = "config.json") -> Path:
    """`path` as a directory holding `must_contain`, or one clear error."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise PandoraError(
            f"{what}: pretrained path '{path}' is not a local directory. Download the weights "
            f"beforehand and point the recipe at the folder (no hub access at run time)"
        )
    if not (folder / must_contain).is_file():
        raise PandoraError(
            f"{what}: '{folder}' has no {must_contain}; expected a folder written by "
            f"save_pretrained() in the transformers/diffusers format"
        )
    return folder


def has_weights(folder: Path) -> bool:
    return any(p.name.endswith(WEIGHT_SUFFIXES) for p in folder.iterdir() if p.is_file())


def check_weights(folder: Path, what: str, options: LoadOptions) -> bool:
    """True when the weights are to be read; a config-only folder where weights are needed is an error."""
    if not options.read_weights:
        return False
    if not has_weights(folder):
        raise PandoraError(
            f"{what}: '{folder}' holds a config but no weights (*.safetensors / *.bin); download the weights, "
            f"or set model.weights=random to build it with random weights (for planning and benchmarks)"
        )
    return True


def read_config(folder: Path, name: str = "config.json") -> dict:
    try:
        return json.loads((folder / name).read_text())
    except json.JSONDecodeError as err:
        raise PandoraError(f"'{folder / name}' is not valid JSON ({err})") from None


def fingerprint(folder: str | Path) -> dict:
    """What a checkpoint remembers of a pretrained folder: its path, every file's size, a hash of its configs."""
    root = Path(folder).expanduser().resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    digest = hashlib.sha256()
    for p in files:
        if p.suffix == ".json":
            digest.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return {"path": str(root), "sizes": {str(p.relative_to(root)): p.stat().st_size for p in files}, "config_sha256": digest.hexdigest()}


def check_fingerprint(saved: dict, folder: str | Path, what: str) -> None:
    """Raise one line naming the folder and what changed since `saved` was taken."""
    now = fingerprint(folder) if Path(folder).expanduser().is_dir() else None
    if now is None:
        raise PandoraError(f"{what}: pretrained folder '{folder}' does not exist (the checkpoint was trained on '{saved['path']}')")
    for name, size in saved["sizes"].items():
        if name not in now["sizes"]:
            raise PandoraError(f"{what}: pretrained folder '{folder}' changed since the checkpoint was written: {name} is gone")
        if now["sizes"][name] != size:
            raise PandoraError(
                f"{what}: pretrained folder '{folder}' changed since the checkpoint was written: "
                f"{name} is {now['sizes'][name]} bytes, was {size}"
            )
    if now["config_sha256"] != saved["config_sha256"]:
        raise PandoraError(f"{what}: pretrained folder '{folder}' changed since the checkpoint was written: its config files differ")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(folder: Path, what: str, options: LoadOptions):
    """The folder's own tokenizer; None on the meta device when it has none (nothing is tokenized there)."""
    from transformers import AutoTokenizer

    if any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(folder)
    if options.meta:
        return None
    raise PandoraError(
        f"{what}: '{folder}' has no tokenizer ({', '.join(_TOKENIZER_FILES)}); copy the model's tokenizer files into it"
    )
