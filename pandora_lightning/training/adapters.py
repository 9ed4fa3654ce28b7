"""Adapter folders: each component's adapter in peft's own format, plus what its base must be.

    <adapter>/pandora_adapter.json             name, components, base checkpoint and fingerprints, recipe
    <adapter>/<component>/adapter_config.json  peft's LoraConfig
    <adapter>/<component>/adapter_model.safetensors

A component folder opens with plain peft on the base component, e.g.
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llm_dir), "<adapter>/llm")`
(tensor names `base_model.model.<layer>.lora_A.weight`, as `PeftModel.save_pretrained` writes them).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from pandora_lightning.errors import PandoraError
from pandora_lightning.training.lora import adapter_names, inject, lora_base
from pandora_lightning.training.recipe import ADAPTER_NAME, LORA_COMPONENTS

META = "pandora_adapter.json"
PEFT_PREFIX = "base_model.model."
FORMAT = 1


def fingerprint(module: nn.Module, samples: int = 256) -> str:
    """A short hash of a component's base weights (LoRA layers left out).

    Names, shapes and a strided sample of every tensor, rounded to bfloat16 so that the same weights
    stored in fp32, bf16 or fp16 give the same fingerprint; cheap even for a 7B LLM.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if "lora_" in name:
            continue
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // samples)][:samples]
        digest.update(f"{name.replace('.base_layer.', '.')}:{tuple(tensor.shape)};".encode())
        if sample.is_floating_point():
            digest.update(sample.float().to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
        else:
            digest.update(sample.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_adapter(model: nn.Module, name: str, out_dir: str | Path, base_checkpoint: str | None, recipe: dict | None = None) -> Path:
    """Write adapter `name` of every component that holds it into `out_dir`."""
    out = Path(out_dir)
    components = {}
    for component in LORA_COMPONENTS:
        module = lora_base(model, component)
        if name not in adapter_names(module):
            continue
        folder = out / component
        folder.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(module, adapter_name=name)
        tensors = {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        module.peft_config[name].save_pretrained(folder)
        components[component] = {
            "fingerprint": fingerprint(module),
            "base_class": type(module).__name__,
            "parameters": sum(v.numel() for v in state.values()),
        }
    if not components:
        raise PandoraError(f"the model holds no adapter named '{name}' to save")
    meta = {"format": FORMAT, "name": name, "base_checkpoint": base_checkpoint, "components": components, "recipe": recipe}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_adapter(path: str | Path) -> dict:
    """The adapter folder's description (pandora_adapter.json), checked."""
    path = Path(path)
    if not (path / META).is_file():
        what = "does not exist" if not path.exists() else f"is not an adapter folder (no {META})"
        raise PandoraError(f"adapter '{path}' {what}; an adapt run writes one to runs/<name>/adapt/<adapter>/adapter")
    try:
        meta = json.loads((path / META).read_text())
    except json.JSONDecodeError as err:
        raise PandoraError(f"adapter '{path}': {META} is not valid JSON ({err})") from None
    if meta.get("format") != FORMAT:
        raise PandoraError(f"adapter '{path}' has format {meta.get('format')}; this version reads format {FORMAT}")
    return meta


def load_adapter(model: nn.Module, path: str | Path, name: str | None = None) -> str:
    """Add the adapter folder at `path` to `model` under `name` (default: its own) and return the name.

    Refuses an adapter trained on another base (layer shapes or base fingerprint differ) and a name
    the model already holds. The adapter is loaded, not activated: see `lora.use_adapter`.
    """
    meta = read_adapter(path)
    name = name or meta["name"]
    if not ADAPTER_NAME.fullmatch(name) or name == "base":
        raise PandoraError(f"adapter name '{name}': use letters, digits, '_' and '-' ('base' is reserved for no adapter)")
    loaded = {n for c in LORA_COMPONENTS for n in adapter_names(lora_base(model, c))}
    if name in loaded:
        raise PandoraError(f"two adapters are named '{name}' ({path} and one loaded before); give one another name (NAME=PATH)")
    for component, info in meta["components"].items():
        module = lora_base(model, component)
        folder = Path(path) / component
        try:
            state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(folder / "adapter_model.safetensors").items()}
            config = PeftLoraConfig.from_pretrained(str(folder))
        except Exception as err:  # safetensors and peft raise several types for damaged files
            raise PandoraError(f"adapter '{path}': its {component} files cannot be read ({type(err).__name__}: {err})") from None
        wrong = _misfit(module, state)
        here = fingerprint(module)
        if wrong or here != info["fingerprint"]:
            why = wrong or f"base fingerprint {info['fingerprint']}, this one's is {here}"
            raise PandoraError(
                f"adapter '{name}' ({path}) was trained on another base {component} ({why}); its base checkpoint was "
                f"{meta.get('base_checkpoint')}"
            )
        inject(config, module, name)
        result = set_peft_model_state_dict(module, state, adapter_name=name)
        missing = [k for k in result.missing_keys if f".{name}." in k]
        if missing:
            raise PandoraError(f"adapter '{path}': its {component} file lacks {len(missing)} LoRA tensors, e.g. {missing[0]}")
    return name


def _misfit(module: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """Why the adapter tensors cannot sit on this module's layers, or '' when they can."""
    layers = dict(module.named_modules())
    for key, value in state.items():
        layer_name, _, kind = key.rpartition(".lora_")
        layer = layers.get(layer_name)
        if layer is None:
            return f"it adapts layer {layer_name}, which this one lacks"
        base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        size = getattr(base, "in_features" if kind.startswith("A") else "out_features", None)
        got = value.shape[1] if kind.startswith("A") else value.shape[0]
        if size is not None and value.ndim == 2 and got != size:
            side = "inputs" if kind.startswith("A") else "outputs"
            return f"layer {layer_name} has {size} {side} here, the adapter's {got}"
    return ""


def adapter_size(path: str | Path) -> int:
    """Bytes of the adapter's tensor files."""
    return sum(f.stat().st_size for f in Path(path).glob("*/adapter_model.safetensors"))


def resolve_adapter(arg: str, checkpoint: str | Path) -> tuple[str | None, Path]:
    """`--adapter` value -> (name or None for the folder's own, folder).

    PATH (an adapter folder), NAME (the adapt run `runs/<name>/adapt/NAME` beside the base checkpoint's
    run), or NEWNAME=PATH|NAME to load it under another name.
    """
    rename, sep, target = arg.partition("=")
    if not sep:
        rename, target = None, arg
    path = Path(target)
    if (path / META).is_file() or path.is_dir():
        return rename, path
    ckpt = Path(checkpoint)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    library = run_dir.parent / "adapt"
    if (library / target / "adapter").is_dir():
        return rename, library / target / "adapter"
    known = sorted(p.parent.name for p in library.glob("*/adapter")) if library.is_dir() else []
    raise PandoraError(
        f"--adapter '{arg}' is neither an adapter folder nor the name of an adapt run in {library} "
        f"(known there: {', '.join(known) or 'none'})"
    )


def attach_adapters(module, checkpoint: str | Path, adapters: list[str]) -> list[str]:
    """Load adapters (`--adapter` values) side by side onto the stage's model; returns their names.

    The base is the checkpoint's model with its own LoRA merged (what the adapt stage trained on);
    an adapt checkpoint is already such a base with one adapter on it.
    """
    from pandora_lightning.training.lora import merge_lora

    if not adapters:
        return []
    if module.stage != "adapt":
        merge_lora(module.model)
    resolved = [resolve_adapter(a, checkpoint) for a in adapters]
    names = [name or read_adapter(path)["name"] for name, path in resolved]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PandoraError(f"two adapters are named '{dupes[0]}' ({', '.join(adapters)}); load one as NEWNAME=PATH")
    return [load_adapter(module.model, path, name) for name, path in resolved]
