"""Reading parts of tensors from a pretrained folder's safetensors files, without reading the rest.

A transformers or diffusers release stores its weights as one `model.safetensors` /
`diffusion_pytorch_model.safetensors`, or as shards named by a `*.safetensors.index.json`
(`weight_map`: tensor name -> shard file). `WeightFiles` opens them lazily and returns any
rectangular slice of a tensor (safetensors reads only those bytes), counting the elements it
returns, so a rank that owns rows [a, b) of a weight reads just those rows.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from pandora_lightning.errors import PandoraError

# What each reader has returned, elements per tensor key ("<folder>::<key>"), for measurements and tests.
ELEMENTS_READ: dict[str, int] = {}


class WeightFiles:
    """The safetensors tensors of one folder (or of one file), by name: shapes from the headers, slices on demand."""

    def __init__(self, folder: str | Path, what: str):
        self.folder = Path(folder).expanduser()
        self.what = what
        self.files = self._weight_map()
        self._open: dict[Path, object] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}

    def _weight_map(self) -> dict[str, Path]:
        """Tensor name -> the file holding it."""
        if self.folder.is_file():
            return self._keys_of([self.folder])
        indexes = sorted(self.folder.glob("*.safetensors.index.json"))
        if indexes:
            out = {}
            for index in indexes:
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (OSError, KeyError, json.JSONDecodeError) as err:
                    raise PandoraError(f"{self.what}: '{index}' is not a safetensors index ({type(err).__name__}: {err})") from None
                out.update({key: self.folder / name for key, name in weight_map.items()})
            return out
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            found = sorted(p.name for p in self.folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            raise PandoraError(
                f"{self.what}: '{self.folder}' holds no *.safetensors ({', '.join(found) or 'no weights'}); loading each "
                f"rank's shard reads safetensors only: convert the folder with save_pretrained(safe_serialization=True) "
                f"or set parallel.meta_init=false"
            )
        return self._keys_of(files)

    def _keys_of(self, files: list[Path]) -> dict[str, Path]:
        out = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    out.update({key: path for key in f.keys()})
            except Exception as err:  # a damaged header or truncated file
                raise PandoraError(f"{self.what}: '{path}' cannot be read ({type(err).__name__}: {err})") from None
        return out

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def keys(self) -> list[str]:
        return list(self.files)

    def _handle(self, key: str):
        path = self.files[key]
        if path not in self._open:
            if not path.is_file():
                raise PandoraError(f"{self.what}: '{self.folder}' names {path.name} in its index for '{key}', but the file is missing")
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path]

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._shapes:
            self._shapes[key] = tuple(self._handle(key).get_slice(key).get_shape())
        return self._shapes[key]

    def read(self, key: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        """Tensor `key`, or the rectangular part `index` (one slice per leading dimension) of it."""
        if not self.shape(key):  # a 0-d tensor: nothing to slice
            out = self._handle(key).get_tensor(key)
        else:
            out = self._handle(key).get_slice(key)[index] if index else self._handle(key).get_tensor(key)
        counter = f"{self.folder}::{key}"
        ELEMENTS_READ[counter] = ELEMENTS_READ.get(counter, 0) + out.numel()
        return out

    def close(self) -> None:
        self._open.clear()


def elements_read() -> int:
    """All elements every WeightFiles of this process has returned."""
    return sum(ELEMENTS_READ.values())
