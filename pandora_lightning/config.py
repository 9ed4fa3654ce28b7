"""Recipes: YAML -> OmegaConf structured config (struct mode) -> typed dataclasses.

One route for every config in the project: `load_structured(Schema, yaml_path, overrides)`.
Unknown keys, wrong types and failed `__post_init__` checks all become a `PandoraError` that names
the file, the key and, for typos, the nearest valid keys.
"""
from __future__ import annotations

import difflib
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from pandora_lightning.errors import PandoraError

T = TypeVar("T")


def _nearest_keys(err: ConfigKeyError) -> str:
    key = str(err.key)
    schema = err.object_type
    valid = [f.name for f in fields(schema)] if schema is not None and is_dataclass(schema) else []
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"valid keys here: {', '.join(valid)}"
    return f"unknown key '{err.full_key or key}' ({hint})"


def _still_missing(layers: list) -> list[str]:
    """Keys a layer marks `???` (a value only the user can give, such as a local folder) that no later
    layer sets. OmegaConf's merge keeps the earlier value over `???`, so it cannot tell by itself."""
    missing = []
    for i, layer in enumerate(layers):
        for key in OmegaConf.missing_keys(layer):
            later = (OmegaConf.select(later, key, default=None, throw_on_missing=False) for later in layers[i + 1 :])
            if not any(value is not None and value != "???" for value in later):
                missing.append(key)
    return sorted(missing)


def load_structured(schema_cls: type[T], sources: list[Any], what: str) -> T:
    """Merge `sources` (YAML paths, dicts, or "key=value" lists) onto the schema and build the dataclass."""
    schema = OmegaConf.structured(schema_cls)
    layers = []
    for src in sources:
        if isinstance(src, (str, Path)):
            path = Path(src)
            if not path.is_file():
                raise PandoraError(f"{what}: file '{path}' does not exist")
            try:
                layer = OmegaConf.load(path)
            except (UnicodeDecodeError, yaml.YAMLError) as err:
                raise PandoraError(f"{what}: '{path}' is not a YAML text file ({type(err).__name__})") from None
            if not isinstance(layer, DictConfig):
                raise PandoraError(f"{what}: '{path}' holds a YAML {type(layer).__name__.removesuffix('Config').lower()}, "
                                   f"not a mapping of keys to values")
            layers.append(layer)
        elif isinstance(src, list):
            bad = [s for s in src if "=" not in s]
            if bad:
                raise PandoraError(f"{what}: overrides must look like key=value, got {bad}")
            layers.append(OmegaConf.from_dotlist(src))
        else:
            layers.append(OmegaConf.create(src))
    missing = _still_missing(layers)
    if missing:
        raise PandoraError(
            f"{what}: {', '.join(repr(k) for k in missing)} {'is' if len(missing) == 1 else 'are'} required; "
            f"give {'it' if len(missing) == 1 else 'them'} on the command line as {missing[0]}=..."
        )
    try:
        merged = OmegaConf.merge(schema, *layers)
        return OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        raise PandoraError(f"{what}: {_nearest_keys(err)}") from None
    except OmegaConfBaseException as err:
        raise PandoraError(f"{what}: {type(err).__name__}: {str(err).splitlines()[0]} (key '{err.full_key}')") from None
    except ValueError as err:
        raise PandoraError(f"{what}: {err}") from None


def to_dict(config) -> dict:
    """A config dataclass as plain containers (what checkpoints and run folders store)."""
    return OmegaConf.to_container(OmegaConf.structured(config))
