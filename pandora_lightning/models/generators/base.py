"""What every generator family shares: the interface the world model and the stages use, and loading.

A family turns clips (B, T, 3, H, W) in [-1, 1] into its latents, trains with its own scheduler's
target and samples with its own sampler. The world model only sees this interface:

    context_dim / context_tokens   what the output adapter must produce (B, N, context_dim)
    forward(frames, context)       (prediction, target) on the new frames; their MSE is the loss
    sample(given, context)         the next clip, the given frames first

`frames` and `cond_frames` count pixel frames; the first `cond_frames` of a clip are given.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pandora_lightning.errors import PandoraError
from pandora_lightning.models.loading import build_empty, has_weights, local_dir

# load the stored weights | random init from the configs | shapes only | parameters on meta, read later per rank
INITS = ("weights", "random", "meta", "lazy")


def read_model_index(folder: Path) -> dict:
    path = folder / "model_index.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PandoraError(f"generator '{folder}': cannot read model_index.json ({err})") from None


def load_part(folder: Path, sub: str, classes: dict[str, type], init: str = "weights", dtype: torch.dtype | None = None) -> nn.Module:
    """`folder/sub` (a diffusers or transformers save_pretrained folder) as one of `classes`, by its config's class name."""
    path = local_dir(str(folder / sub), f"generator {sub}")
    config = json.loads((path / "config.json").read_text())
    name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if name not in classes:
        raise PandoraError(f"generator {sub}: '{path}' holds a {name}; this family takes {' or '.join(sorted(classes))}")
    cls = classes[name]
    if init in ("weights", "lazy") and not has_weights(path):
        raise PandoraError(
            f"generator {sub}: '{path}' holds a config but no weights (*.safetensors / *.bin); download the weights, "
            f"or set model.weights=random to build it with random weights (for planning and benchmarks)"
        )
    if init == "weights":
        return cls.from_pretrained(path, **({"torch_dtype": dtype} if dtype else {}))

    def build():
        if hasattr(cls, "load_config"):  # diffusers
            return cls.from_config(cls.load_config(path))
        return cls._from_config(cls.config_class.from_pretrained(path))

    if init != "lazy":
        with torch.device("meta" if init == "meta" else "cpu"):
            model = build()
        return model.to(dtype) if dtype and init != "meta" else model
    # lazy: as from_pretrained builds it (see build_empty), in the dtypes it loads
    diffusers = hasattr(cls, "load_config")
    model = build_empty(build, undo_draws=not diffusers, default_dtype=dtype if diffusers else None)
    if dtype:
        model.to(dtype)
    keep = getattr(cls, "_keep_in_fp32_modules", None) if diffusers and dtype in (torch.float16, torch.bfloat16) else None
    for name, param in model.named_parameters() if keep else ():  # diffusers loads these in float32
        if any(part in name.split(".") for part in keep):
            param.data = param.data.float()
    return model


def freeze(module: nn.Module | None) -> nn.Module | None:
    """Frozen parts the family needs but never trains (VAE, image encoder): no grad, eval mode."""
    if module is not None:
        module.requires_grad_(False).eval()
    return module


def read_processor(folder: Path, sub: str) -> dict:
    """An image processor's preprocessor_config.json (mean, std, crop size) as a plain dict."""
    path = folder / sub / "preprocessor_config.json"
    if not path.is_file():
        raise PandoraError(f"generator '{folder}': the image encoder needs {sub}/preprocessor_config.json (its mean, std and size)")
    return json.loads(path.read_text())


def _size(value, key: str) -> tuple[int, int]:
    if isinstance(value, dict):
        if key in value:
            return value[key], value[key]
        return value["height"], value["width"]
    return value, value


def clip_pixels(image: torch.Tensor, processor: dict, square_crop: bool) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> a CLIP vision tower's input: crop, resize to its size, normalise.

    square_crop: the centre square first (I2VGen-XL crops the widest centre square), else the
    processor's own shortest-side resize then centre crop (CLIPImageProcessor).
    """
    h, w = image.shape[-2:]
    ch, cw = _size(processor.get("crop_size", 224), "height")
    x = (image.float() + 1) / 2
    if square_crop:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = F.interpolate(x[..., top : top + side, left : left + side], size=(ch, cw), mode="bilinear", antialias=True, align_corners=False)
    else:
        short = _size(processor.get("size", {"shortest_edge": 224}), "shortest_edge")[0]
        scale = short / min(h, w)
        x = F.interpolate(x, size=(max(ch, round(h * scale)), max(cw, round(w * scale))), mode="bicubic", antialias=True, align_corners=False)
        top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
        x = x[..., top : top + ch, left : left + cw]
    mean = torch.tensor(processor.get("image_mean", [0.48145466, 0.4578275, 0.40821073]), device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(processor.get("image_std", [0.26862954, 0.26130258, 0.27577711]), device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def tile_frames(latents: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Repeat the k known frames along `dim` until there are n: [a b c a b c ...] (one frame: SVD's repeat)."""
    k = latents.shape[dim]
    reps = [1] * latents.dim()
    reps[dim] = -(-n // k)
    return latents.repeat(*reps).narrow(dim, 0, n)


class UNetDenoiser:
    """What the UNet-based generators (tiny, svd, i2vgen-xl) share: the UNet is the denoiser."""

    @property
    def backbone(self):
        """The denoiser: what trains (generator.unet.*) and takes LoRA; VAE and encoders stay frozen."""
        return self.unet

    @property
    def context_dim(self) -> int:
        return self.unet.config.cross_attention_dim

    @property
    def cond_latent_frames(self) -> int:
        return self.cfg.cond_frames


class FamilyGenerator(nn.Module):
    """Base of the pretrained families; subclasses set the class attributes and the methods below."""

    family: ClassVar[str]
    has_text_teacher: ClassVar[bool] = True
    # Frozen children whose per-frame outputs `precompute` gives, so that training from precomputed
    # inputs builds them on the meta device only (never reads their weights) and drops them.
    frozen_parts: ClassVar[tuple[str, ...]] = ()
    # Why this family cannot train from precomputed inputs (None: it can).
    precompute_refusal: ClassVar[str | None] = None
    needs_frames: ClassVar[bool] = False  # whether training from precomputed inputs still needs the pixels
    default_steps: ClassVar[int]
    default_guidance: ClassVar[float]

    def __init__(self, cfg, folder: Path):
        super().__init__()
        self.cfg = cfg
        self.folder = folder

    @property
    def num_inference_steps(self) -> int:
        return self.cfg.num_inference_steps or self.default_steps

    @property
    def guidance_scale(self) -> float:
        return self.default_guidance if self.cfg.guidance_scale is None else self.cfg.guidance_scale

    @property
    def context_tokens(self) -> int | None:
        """The number of context tokens the backbone requires; None = any."""
        return None

    @property
    def needs_uncond_context(self) -> bool:
        """Whether `sample` wants the adapter's answer to an empty text (classifier-free guidance)."""
        return self.guidance_scale > 1

    def check_size(self, multiple: int, why: str) -> None:
        height, width = self.cfg.size
        if height % multiple or width % multiple:
            raise PandoraError(
                f"generator family {self.family} takes frame heights and widths that are multiples of {multiple} ({why}); "
                f"got {height}x{width}"
            )


class PromptEncoder(nn.Module):
    """A family's own text encoding, the align stage's teacher: B texts -> (B, N, D), as its pipeline's prompt_embeds.

    `encode(model, tokenizer, texts, length)` is the family's function (CLIP penultimate layer,
    UMT5 with zeros after the text, ...); `length` is the token count N.
    """

    def __init__(self, model: nn.Module, tokenizer, encode, length: int):
        super().__init__()
        self.model = freeze(model)
        self.tokenizer = tokenizer
        self.encode = encode
        self.length = length

    @property
    def width(self) -> int:
        return self.model.config.hidden_size if hasattr(self.model.config, "hidden_size") else self.model.config.d_model

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.encode(self.model, self.tokenizer, texts, self.length)
