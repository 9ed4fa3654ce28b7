"""`export CKPT DIR`: a checkpoint as folders that plain transformers, diffusers and peft open.

    DIR/export.json           what is where (the manifest), the checkpoint, stage, recipe, dtypes
    DIR/README.md             the same for people, with the from_pretrained lines
    DIR/llm/                  transformers save_pretrained of the causal LM, with its tokenizer
    DIR/vision/               transformers save_pretrained of the vision tower (+ its image processor file)
    DIR/generator/            diffusers layout: the denoiser (unet/ or transformer/) written from the
                              trained model; the folder's other parts (vae/, scheduler/, model_index.json ...)
                              copied unchanged from the generator's pretrained folder
    DIR/lora/<name>/          each LoRA adapter, one peft folder per component (PeftModel.from_pretrained
                              on the part above opens it); absent with `merge`
    DIR/pandora/              the project's own parts: input_adapter, output_adapter, query_tokens (answer_adapter)
                              (.safetensors) + config.json (their configs and sizes)

The base weights are the checkpoint's: a pretrained folder's tensors plus whatever training changed
(a trained UNet, the LLM decoder of the tiny recipe), and, with `--adapter` on an instruct checkpoint or for
an adapt checkpoint, the checkpoint's own LoRA folded in (the base its adapters were trained on).
`merge` folds the one active adapter into the weights (peft's merge) and writes no adapter folders.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pandora_lightning import __version__
from pandora_lightning.errors import PandoraError
from pandora_lightning.training.adapters import attach_adapters, resolve_adapter, save_adapter
from pandora_lightning.training.checkpoint import load_checkpoint_file, load_stage
from pandora_lightning.training.lora import adapter_names, lora_base, merge_lora, tuner_layers, use_adapter
from pandora_lightning.training.recipe import LORA_COMPONENTS, training_recipe_from_dict

FORMAT = "pandora-lightning/export/1"
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def check_out_dir(out: Path, overwrite: bool) -> None:
    """DIR must be new or empty; --overwrite replaces an earlier export, never another folder's files."""
    if out.exists() and not out.is_dir():
        raise PandoraError(f"export: '{out}' exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PandoraError(f"export: '{out}' exists and is not empty; pass --overwrite to replace it, or name a new folder")
        if not (out / "export.json").is_file():
            raise PandoraError(f"export --overwrite: '{out}' holds files but no export.json; it is not replaced (name a new folder)")
        shutil.rmtree(out)


def stored_dtype(folder: str | Path | None) -> torch.dtype | None:
    """The floating dtype a pretrained folder's weights are stored in (from a safetensors header), or None."""
    if folder is None:
        return None
    for path in sorted(Path(folder).expanduser().glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                dtype = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
                if dtype is not None:
                    return dtype
    return None


@contextlib.contextmanager
def plain_layers(module: nn.Module):
    """Within: `module` with its LoRA layers swapped for their base layers (what save_pretrained should see)."""
    layers = tuner_layers(module)
    config = module.__dict__.pop("peft_config", None)
    for name, layer in layers:
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, layer.get_base_layer())
    try:
        yield module
    finally:
        for name, layer in layers:
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, layer)
        if config is not None:
            module.peft_config = config


def _save_pretrained(module: nn.Module, folder: Path, dtype: torch.dtype) -> None:
    """save_pretrained of `module`'s base layers in `dtype` (cast in place: the export owns its model)."""
    with plain_layers(module):
        module.to(dtype)
        module.save_pretrained(folder)


def _part_dtype(choice: str, source: str | None, changed: bool) -> torch.dtype:
    """--dtype auto: a part as its folder stored it, unless training or a merge changed it (then float32)."""
    if DTYPES[choice] is not None:
        return DTYPES[choice]
    return (None if changed else stored_dtype(source)) or torch.float32


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _lora_components(model: nn.Module) -> set[str]:
    return {c for c in LORA_COMPONENTS if tuner_layers(lora_base(model, c))}


def _stored_names(path: str | Path) -> tuple[set[str], dict]:
    """WorldModel names of the non-LoRA tensors a checkpoint holds (they differ from any folder's), and its meta."""
    ckpt = load_checkpoint_file(path)
    return {k.removeprefix("model.") for k in ckpt["state_dict"] if "lora_" not in k}, ckpt["hyper_parameters"]


def load_for_export(checkpoint: str | Path, adapters: list[str], merge: bool):
    """The checkpoint's stage in float32 on the CPU with `adapters` loaded; returns (module, adapters held,
    components whose base weights a LoRA was folded into, tensor names training changed)."""
    module = load_stage(checkpoint, "cpu", "32-true")
    changed, _ = _stored_names(checkpoint)
    folded: set[str] = set()
    if module.stage == "adapt":  # its base: the checkpoint it started from, with that one's LoRA merged
        base = module.hparams.get("base_checkpoint", {}).get("path") or module.recipe.init_from
        names, meta = _stored_names(base)
        changed |= names
        folded |= set(training_recipe_from_dict(meta["recipe"]).lora.components())
    elif adapters:
        folded |= _lora_components(module.model)  # attach_adapters merges the checkpoint's own LoRA first
    if adapters:
        attach_adapters(module, checkpoint, adapters)
    held = sorted({n for c in LORA_COMPONENTS for n in adapter_names(lora_base(module.model, c))})
    if merge:
        if len(held) > 1:
            raise PandoraError(
                f"export --merge folds one adapter into the weights, but the model holds {len(held)} ({', '.join(held)}); "
                f"pick one with --adapter, or export without --merge (each adapter gets its peft folder)"
            )
        if held:
            use_adapter(module.model, held[0])
            folded |= _lora_components(module.model)
            merge_lora(module.model)
    return module, held, folded, changed


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, adapters: list[str] = (), merge: bool = False, dtype: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Write the export folder (see the module docstring); returns it. `dtype` auto: each part as its
    pretrained folder stores it, float32 where training or a merge changed it or no folder gave it."""
    if dtype not in DTYPES:
        raise PandoraError(f"--dtype '{dtype}' is unknown; use one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    hyper = load_checkpoint_file(checkpoint)["hyper_parameters"]  # the cheap checks first
    for adapter in adapters:
        resolve_adapter(adapter, checkpoint)
    check_out_dir(out, overwrite)
    module, held, folded, stored = load_for_export(checkpoint, list(adapters), merge)
    model = module.model
    out.mkdir(parents=True, exist_ok=True)

    def changed(prefix: str, component: str) -> bool:
        """Whether a part's weights differ from its folder's: training changed some, or a LoRA was folded in."""
        return component in folded or any(n.startswith(prefix) for n in stored)

    manifest = {"format": FORMAT, "version": __version__, "checkpoint": str(checkpoint), "stage": module.stage,
                "merged": merge, "adapters": {}, "parts": {}}
    if merge and held:
        manifest["merged_adapter"] = held[0]
    if not merge:  # adapters first: the parts below are cast in place
        for name in held:
            folder = save_adapter(model, name, out / "lora" / name, str(checkpoint), hyper.get("recipe"))
            manifest["adapters"][name] = {c: f"lora/{name}/{c}" for c in LORA_COMPONENTS if (folder / c).is_dir()}
    parts = manifest["parts"]
    parts["llm"] = _export_llm(model, out, _part_dtype(dtype, model.llm.pretrained.get("model"), changed("llm.model.", "llm")))
    parts["vision"] = _export_vision(model, out, _part_dtype(dtype, model.vision.pretrained.get("tower"), changed("vision.", "vision")))
    parts["generator"] = _export_generator(model, out, dtype, changed("generator.", "generator"))
    parts.update(_export_own(model, out))
    if model.text_encoder is not None:
        manifest["left_out"] = {"text_encoder": "the align stage's distillation teacher; not needed to run the model "
                                                "(a family generator's own text encoder is in generator/ when its folder had one)"}
    manifest["recipe"] = hyper.get("recipe")
    manifest["vocabulary"] = hyper.get("vocabulary")
    (out / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "README.md").write_text(readme(manifest))
    return out


def _export_llm(model: nn.Module, out: Path, dtype: torch.dtype) -> dict:
    llm = model.llm
    _save_pretrained(llm.model, out / "llm", dtype)
    llm.tokenizer.save_pretrained(out / "llm")
    return {"path": "llm", "library": "transformers", "class": type(llm.model).__name__, "dtype": _name(dtype),
            "source": llm.cfg.pretrained or "built from the recipe (tiny)",
            "open": "AutoModelForCausalLM.from_pretrained(DIR/llm), AutoTokenizer.from_pretrained(DIR/llm)"}


def _export_vision(model: nn.Module, out: Path, dtype: torch.dtype) -> dict:
    vision = model.vision
    _save_pretrained(vision.tower, out / "vision", dtype)
    source = vision.cfg.pretrained
    processor = Path(source).expanduser() / "preprocessor_config.json" if source else None
    if processor is not None and processor.is_file():
        shutil.copy2(processor, out / "vision" / processor.name)
    return {"path": "vision", "library": "transformers", "class": type(vision.tower).__name__, "dtype": _name(dtype),
            "source": source or "built from the recipe (tiny)", "feature_layer": vision.cfg.feature_layer,
            "open": f"{type(vision.tower).__name__}.from_pretrained(DIR/vision)"}


def _export_generator(model: nn.Module, out: Path, choice: str, changed: bool) -> dict:
    """The denoiser written from the model; the pretrained folder's other parts copied as they are."""
    gen = model.generator
    denoiser = next(name for name, child in gen.named_children() if child is gen.backbone)
    root = out / "generator"
    root.mkdir(parents=True)
    source, copied = gen.cfg.pretrained, []
    if source:
        for entry in sorted(Path(source).expanduser().iterdir()):
            if entry.name == denoiser or entry.name.startswith("."):
                continue
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, root / entry.name)
            copied.append(entry.name)
    else:  # the tiny generator: its UNet and its sampler's schedule (pixel space: no VAE)
        gen.sample_scheduler.save_pretrained(root / "scheduler")
    dtype = _part_dtype(choice, getattr(gen, "pretrained", {}).get(denoiser), changed)
    _save_pretrained(gen.backbone, root / denoiser, dtype)
    return {"path": "generator", "library": "diffusers", "family": gen.family, "denoiser": f"generator/{denoiser}",
            "class": type(gen.backbone).__name__, "dtype": _name(dtype), "copied_from_source": copied,
            "source": source or "built from the recipe (tiny)",
            "open": f"{type(gen.backbone).__name__}.from_pretrained(DIR/generator/{denoiser})"}


def _export_own(model: nn.Module, out: Path) -> dict:
    """The project's parts (float32 safetensors) and a config.json to rebuild them with its classes."""
    folder = out / "pandora"
    folder.mkdir()
    parts = {}
    for name in ("input_adapter", "output_adapter"):
        module = getattr(model, name)
        with plain_layers(module):  # a LoRA on the output adapter is in lora/<name>/output_adapter
            save_file({k: v.detach().float().contiguous() for k, v in module.state_dict().items()}, folder / f"{name}.safetensors")
        cls = type(module).__name__
        parts[name] = {"path": f"pandora/{name}.safetensors", "class": f"pandora_lightning.models.{name}.{cls}",
                       "dtype": "float32", "open": f"{cls}({cls}Config(**c['config']), c['in_dim'], c['out_dim']) with c = "
                       f"pandora/config.json['{name}'], then load_state_dict(safetensors.torch.load_file(...))"}
    save_file({"query_tokens": model.llm.query_tokens.detach().float().contiguous()}, folder / "query_tokens.safetensors")
    parts["query_tokens"] = {"path": "pandora/query_tokens.safetensors", "shape": list(model.llm.query_tokens.shape), "dtype": "float32",
                             "use": "appended after the action text's embeddings; the LLM's last hidden states there feed the output adapter"}
    if model.answer_adapter is not None:  # llm.previous_answer
        weights = {k: v.detach().float().contiguous() for k, v in model.answer_adapter.state_dict().items()}
        save_file(weights, folder / "answer_adapter.safetensors")
        parts["answer_adapter"] = {
            "path": "pandora/answer_adapter.safetensors", "class": "torch.nn.Linear", "dtype": "float32",
            "shape": list(model.answer_adapter.weight.shape),
            "use": "the previous round's generator context, mean over its tokens -> one LLM input token, put first in "
                   "the next round's segment (llm.previous_answer)"}
    cfg = model.cfg
    config = {
        "input_adapter": {"config": asdict(cfg.input_adapter), "in_dim": model.vision.hidden_size, "out_dim": model.llm.hidden_size},
        "output_adapter": {"config": asdict(cfg.output_adapter), "in_dim": model.llm.hidden_size, "out_dim": model.generator.context_dim},
        "query_tokens": {"num_query_tokens": cfg.llm.num_query_tokens, "max_text_tokens": cfg.llm.max_text_tokens},
        "vision": {"feature_layer": cfg.vision.feature_layer, "processing": asdict(model.vision.processing),
                   "keep_aspect": model.vision.keep_aspect},
        "model": asdict(cfg),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    parts["pandora_config"] = {"path": "pandora/config.json", "open": "json: the configs and sizes of the parts above, "
                               "the vision preprocessing, the whole model block of the recipe"}
    return parts


def readme(manifest: dict) -> str:
    """The manifest for people: each part, where it is and the line that opens it."""
    lines = [f"# Export of {manifest['checkpoint']} (stage {manifest['stage']}, pandora-lightning {manifest['version']})", "",
             "LoRA merged into the weights" + (f" (adapter '{manifest['merged_adapter']}')" if manifest.get("merged_adapter") else "")
             if manifest["merged"] else "LoRA adapters as peft folders beside their base parts (`lora/`)", "",
             "| part | where | class | dtype | open with |", "| --- | --- | --- | --- | --- |"]
    for name, part in manifest["parts"].items():
        lines.append(f"| {name} | `{part['path']}` | {part.get('class', '')} | {part.get('dtype', '')} | {part.get('open', part.get('use', ''))} |")
    for name, components in manifest["adapters"].items():
        for component, path in components.items():
            base = {"llm": "DIR/llm", "generator": manifest["parts"]["generator"]["denoiser"], "output_adapter": "an OutputAdapter"}[component]
            lines.append(f"| LoRA '{name}' on {component} | `{path}` | peft LoraConfig | float32 | "
                         f"PeftModel.from_pretrained(<{base} opened as above>, DIR/{path}) |")
    for name, why in manifest.get("left_out", {}).items():
        lines.append(f"| {name} | not exported | | | {why} |")
    lines += ["", "`pandora/config.json` holds the configs and sizes of the project's own parts (rebuild them with the "
              "classes named above and load the .safetensors files); `export.json` lists all of this as JSON, with the "
              "recipe the checkpoint was trained with.", ""]
    return "\n".join(lines)
