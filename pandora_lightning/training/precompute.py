"""Precomputed inputs: the frozen encoders of a recipe run once over the shards (`shards encode`), and
the checks that a recipe with `data.precomputed: true` trains from what those encoders gave.

Which encoders: the vision tower, the teacher text encoder and the generator family's frozen parts
(`frozen_parts`: i2vgen-xl's VAE and CLIP image encoder; the tiny generator works on pixels and has
none). Each is known by a digest: of its folder's fingerprint (every file's size and its configs)
when a folder provides it, else of its tensors (a tiny random tower, or a text encoder trained in
an earlier stage and read from `init_from`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch

from pandora_lightning.config import to_dict
from pandora_lightning.data.frames import to_model_range
from pandora_lightning.data.manifest import EncodingRecord, load_manifest
from pandora_lightning.data.tools.encode import encode_shards
from pandora_lightning.errors import PandoraError
from pandora_lightning.models.loading import fingerprint
from pandora_lightning.models.world_model import WorldModel
from pandora_lightning.training.recipe import TrainingRecipe, training_recipe_from_dict

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CHUNK = 16  # frames through the generator's frozen parts at once


def folder_digest(folder: str) -> str:
    found = fingerprint(folder)
    return "folder:" + hashlib.sha256(json.dumps([found["sizes"], found["config_sha256"]], sort_keys=True).encode()).hexdigest()[:32]


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(key.encode() + b"\0" + str(tuple(value.shape)).encode() + value.numpy().tobytes())
    return "tensors:" + digest.hexdigest()[:32]


def encoder_digests(model: WorldModel) -> dict[str, str]:
    """Frozen encoder name -> digest, the same whether the model holds the encoder or left it out (precomputed)."""
    out = {}
    for name, folder in model.frozen_inputs().items():
        if folder:
            out[name] = folder_digest(folder)
        elif model.precomputed:
            out[name] = tensor_digest({k: v for k, v in model.frozen_input_state.items() if k.startswith(f"{name}.")})
        else:
            out[name] = tensor_digest({f"{name}.{k}": v for k, v in model.get_submodule(name).state_dict().items()})
    return out


def encoding_record(recipe: TrainingRecipe, model: WorldModel, recipe_path: str, dtype: str) -> EncodingRecord:
    gen = recipe.model.generator
    return EncodingRecord(
        recipe=str(recipe_path), family=model.generator.family, height=gen.height, width=gen.width, frames=gen.frames,
        cond_frames=gen.cond_frames, dtype=dtype, encoders=encoder_digests(model),
        folders={k: str(v) for k, v in model.frozen_inputs().items() if v}, needs_frames=model.generator.needs_frames,
    )


def check_precomputed(recipe: TrainingRecipe, model: WorldModel) -> None:
    """A recipe with data.precomputed must read shards encoded by its own encoders at its own clip size (one line if not)."""
    path = recipe.data.manifest
    record = load_manifest(path, check_shards=False, allow_commands=recipe.data.allow_commands).encoding
    if record is None:
        raise PandoraError(f"data.precomputed: manifest {path} holds no precomputed inputs; write them with "
                           f"`pandora-lightning shards encode {path} --recipe RECIPE` and train on the manifest it writes")
    gen = recipe.model.generator
    ours = (gen.height, gen.width, gen.frames, gen.cond_frames)
    theirs = (record.height, record.width, record.frames, record.cond_frames)
    if ours != theirs:
        raise PandoraError(
            f"data.precomputed: manifest {path} was encoded at {theirs[0]}x{theirs[1]}, {theirs[2]} frames with "
            f"{theirs[3]} given, but this recipe takes {ours[0]}x{ours[1]}, {ours[2]} frames with {ours[3]} given; "
            f"encode the shards again with this recipe"
        )
    digests = encoder_digests(model)
    for name in sorted(set(digests) | set(record.encoders)):
        if digests.get(name) != record.encoders.get(name):
            now = model.frozen_inputs().get(name) or ("not used" if name not in digests else "its own tensors")
            then = record.folders.get(name) or ("not encoded" if name not in record.encoders else "other tensors")
            raise PandoraError(
                f"data.precomputed: manifest {path} was encoded by another {name} ({then}) than this recipe's ({now}); "
                f"encode the shards again with this recipe (`pandora-lightning shards encode`)"
            )


def run_encode(manifest_path: str, recipe: TrainingRecipe, recipe_path: str, out: str, manifest_out: str | None = None,
               device: str | None = None, dtype: str = "float32", progress: bool = True, splits: list[str] | None = None) -> dict:
    """Build the recipe's stage (its seed, vocabulary and init_from, as `fit` would) and store its frozen
    encoders' outputs for every sample of `manifest_path` in new shards under `out`."""
    from pandora_lightning.training.checkpoint import init_from
    from pandora_lightning.training.stage import STAGES
    from pandora_lightning.training.vocabulary import needs_vocabulary, resolve_vocabulary, training_texts

    if dtype not in DTYPES:
        raise PandoraError(f"shards encode: --dtype {dtype} is not one of {', '.join(DTYPES)}")
    data = replace(recipe.data, manifest=str(manifest_path), precomputed=False)
    recipe = training_recipe_from_dict({**to_dict(recipe), "data": to_dict(data)})
    if recipe.stage == "adapt":
        raise PandoraError("shards encode: take the instruct recipe the adapter trains on (an adapt recipe's base is a checkpoint)")
    manifest = load_manifest(manifest_path, allow_commands=recipe.data.allow_commands)
    if manifest.encoding is not None:
        raise PandoraError(f"shards encode: {manifest_path} is already encoded (by {manifest.encoding.recipe}); give the manifest of the raw shards")
    L.seed_everything(recipe.seed, workers=True, verbose=False)  # the random encoders `fit` builds from the same seed
    texts = training_texts(recipe) if needs_vocabulary(recipe) else []
    stage = STAGES[recipe.stage].from_recipe(recipe, resolve_vocabulary(recipe, texts))
    if recipe.init_from:
        init_from(stage, recipe.init_from)
    model = stage.model
    if model.generator.precompute_refusal:
        raise PandoraError(f"shards encode: generator family {model.generator.family} cannot train from precomputed inputs: "
                           f"{model.generator.precompute_refusal}")
    record = encoding_record(recipe, model, recipe_path, dtype)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(target).eval()
    return encode_shards(manifest, out, frame_encoder(model, recipe.trainer.precision, DTYPES[dtype]), record,
                         manifest_out, progress, splits) | {"record": record, "device": str(target)}


def frame_encoder(model: WorldModel, precision: str, dtype: torch.dtype):
    """The encode callable of `data.tools.encode`: one clip's frames -> its stored tensors, on the model's device."""
    device = next(model.parameters()).device
    low = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None

    @torch.no_grad()
    def encode(frames: torch.Tensor, given: list[int], texts: list[str]) -> dict[str, torch.Tensor]:
        x = to_model_range(frames.to(device))[None]  # (1, T, 3, H, W), as the stage scales a batch
        with torch.autocast(device.type, dtype=low or torch.float32, enabled=low is not None and "mixed" in precision):
            out = {"vision": model.vision_features(x[:, given])[0] if given else x.new_zeros(0)}
            parts = [model.generator.precompute(x[:, i : i + CHUNK]) for i in range(0, x.shape[1], CHUNK)]
            for name in parts[0]:
                out[f"gen.{name}"] = torch.cat([p[name] for p in parts], dim=1)[0]
            if model.text_encoder is not None:
                out["teacher"] = model.teacher_context(texts)
        return {k: v.detach().to("cpu", dtype) for k, v in out.items()}

    return encode
