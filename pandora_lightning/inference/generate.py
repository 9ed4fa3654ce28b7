"""`generate`: a checkpoint, a start image and one action per round -> an mp4 and a contact sheet."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from pandora_lightning.data.frames import from_numpy, to_numpy
from pandora_lightning.data.video import contact_sheet, save_png, write_mp4
from pandora_lightning.errors import PandoraError
from pandora_lightning.inference.rollout import Rollout
from pandora_lightning.models.world_model import WorldModel
from pandora_lightning.training.adapters import attach_adapters
from pandora_lightning.training.checkpoint import load_stage
from pandora_lightning.training.lora import use_adapter
from pandora_lightning.training.precision import autocast, resolve_device


def read_image(path: str | Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, turned upright by its EXIF orientation (as phones store photos)."""
    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as err:  # OSError: missing, unreadable, truncated
        raise PandoraError(f"start image '{path}' cannot be read: {err}") from None


def read_start_image(path: str | Path, size: tuple[int, int], image: np.ndarray | None = None) -> np.ndarray:
    """A start frame as (H, W, 3) uint8; it must already have the model's (height, width) (no silent resizing)."""
    image = read_image(path) if image is None else image
    if image.shape[:2] != tuple(size):
        raise PandoraError(
            f"start image '{path}' is {image.shape[0]}x{image.shape[1]} but the model generates {size[0]}x{size[1]} "
            f"frames (height x width); resize or crop it first (model.generator.height/width in the recipe)"
        )
    return image


def load_model(
    checkpoint: str | Path, adapter: str | None = None, device: str | torch.device = "cpu", precision: str | None = None
) -> WorldModel:
    """The checkpoint's model in eval mode on `device` in `precision`, with `adapter` (a folder or an adapt
    run's name) running on it."""
    module = load_stage(checkpoint, device, precision)
    if adapter:
        use_adapter(module.model, attach_adapters(module, checkpoint, [adapter])[0])
    return module.model


def generate(
    checkpoint: str | Path, image: str | Path, actions: list[str], out_dir: Path, seed: int = 0, scale: int = 4,
    adapter: str | None = None, device: str | None = None, precision: str | None = None,
) -> tuple[Path, Path]:
    """`device`: None = a GPU when there is one; `precision`: None = the checkpoint's training precision."""
    actions = [a.strip() for a in actions if a.strip()]
    if not actions:
        raise PandoraError("--actions is empty: give one action text per round, e.g. --actions 'move left' 'grow'")
    if scale < 1:
        raise PandoraError(f"--scale {scale}: the upscale of the written video must be >= 1")
    picture = read_image(image)  # the cheap checks first, before the model loads
    where = resolve_device(device)
    model = load_model(checkpoint, adapter, where, precision)
    cfg = model.cfg.generator
    start = read_start_image(image, cfg.size, picture)
    episode = Rollout(model, from_numpy(start)[None].to(where), seed=seed)
    with autocast(model.precision, where):
        for action in tqdm(actions, desc="generate", unit="round"):
            episode.step([action])
    video = to_numpy(episode.video)[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    video_path, sheet_path = out_dir / "rollout.mp4", out_dir / "rollout.png"
    write_mp4(video_path, video, fps=8, scale=scale)
    # One row per round: its given frames, then what it generated.
    n, f = model.cond_frames, model.new_frames
    rows = [video[r * f : r * f + n + f] for r in range(len(actions))]
    save_png(sheet_path, contact_sheet(rows, scale=scale))
    (out_dir / "actions.txt").write_text("\n".join(actions) + "\n")
    return video_path, sheet_path
