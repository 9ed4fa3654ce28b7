"""`generate`: a checkpoint, a start image and one action per round -> an mp4 and a contact sheet."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from pandora_lightning.data.frames import from_numpy, to_numpy
from pandora_lightning.data.video import contact_sheet, save_png, write_mp4
from pandora_lightning.errors import PandoraError
from pandora_lightning.inference.session import ActionCheck, Session
from pandora_lightning.models.world_model import WorldModel
from pandora_lightning.training.adapters import attach_adapters
from pandora_lightning.training.checkpoint import load_stage
from pandora_lightning.training.lora import use_adapter
from pandora_lightning.training.precision import autocast, resolve_device


def fit_start_image(image: Image.Image, size: tuple[int, int], resize: bool, name: str = "start image") -> tuple[np.ndarray, str]:
    """A PIL image -> (H, W, 3) uint8 at the model's (height, width), and a note saying what was changed ("" if nothing).

    Other modes (RGBA, grayscale, palette) are converted to RGB. Another size is refused unless
    `resize`: then the centred crop of the model's aspect ratio is scaled to height x width.
    """
    notes = []
    if image.mode != "RGB":
        notes.append(f"converted from {image.mode} to RGB")
        image = image.convert("RGB")
    height, width = size
    if (image.height, image.width) != (height, width):
        if not resize:
            raise PandoraError(
                f"{name} is {image.height}x{image.width} but the model generates {height}x{width} frames (height x width); "
                f"resize or crop it first (model.generator.height/width in the recipe), or pass --resize"
            )
        scale = min(image.width / width, image.height / height)
        crop_w, crop_h = round(width * scale), round(height * scale)
        left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
        notes.append(f"resized from {image.height}x{image.width} (centre {crop_h}x{crop_w} crop) to {height}x{width}")
        image = image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.Resampling.BICUBIC)
    return np.array(image), "; ".join(notes)


def open_image(source: str | Path | bytes, name: str = "start image") -> Image.Image:
    """An image file or its bytes, turned upright by its EXIF orientation (as phones store photos)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return ImageOps.exif_transpose(image)
    except (OSError, UnidentifiedImageError, ValueError) as err:  # OSError: missing, unreadable, truncated
        raise PandoraError(f"{name} cannot be read as an image: {err}") from None


def read_start_image(path: str | Path, size: tuple[int, int], resize: bool = False) -> tuple[np.ndarray, str]:
    return fit_start_image(open_image(path, f"start image '{path}'"), size, resize, f"start image '{path}'")



def load_model(
    checkpoint: str | Path, adapter: str | None = None, device: str | torch.device = "cpu", precision: str | None = None
) -> WorldModel:
    """The checkpoint's model in eval mode on `device` in `precision`, with `adapter` (a folder or an adapt
    run's name) running on it."""
    module = load_stage(checkpoint, device, precision)
    if adapter:
        use_adapter(module.model, attach_adapters(module, checkpoint, [adapter])[0])
    return module.model


def read_actions_file(path: str | Path) -> list[str]:
    """One action per round from .txt (a line each; blank lines and # comments skipped), .json or .yaml
    (a list of strings, or {"actions": [...]})."""
    path = Path(path)
    if not path.is_file():
        raise PandoraError(f"actions file '{path}' does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise PandoraError(f"actions file '{path}' cannot be parsed: {str(err).splitlines()[0]}") from None
        data = data.get("actions") if isinstance(data, dict) else data
        if not isinstance(data, list) or not all(isinstance(a, str) for a in data):
            raise PandoraError(f"actions file '{path}' must hold a list of action texts (or {{actions: [...]}})")
        return data
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def write_episode(out_dir: Path, video: np.ndarray, actions: list[str], cond_frames: int, new_frames: int, scale: int = 4):
    """rollout.mp4, rollout.png (one row per round: its given frames, then what it generated), actions.txt."""
    out_dir.mkdir(parents=True, exist_ok=True)
    video_path, sheet_path = out_dir / "rollout.mp4", out_dir / "rollout.png"
    write_mp4(video_path, video, fps=8, scale=scale)
    rows = [video[r * new_frames : r * new_frames + cond_frames + new_frames] for r in range(len(actions))]
    save_png(sheet_path, contact_sheet(rows, scale=scale))
    (out_dir / "actions.txt").write_text("\n".join(actions) + "\n")
    return video_path, sheet_path


def generate(
    checkpoint: str | Path, image: str | Path, actions: list[str], out_dir: Path, seed: int = 0, scale: int = 4,
    resize: bool = False, check_action: ActionCheck | None = None, adapter: str | None = None,
    device: str | None = None, precision: str | None = None,
) -> tuple[Path, Path]:
    """`device`: None = a GPU when there is one; `precision`: None = the checkpoint's training precision."""
    if not actions:
        raise PandoraError("no actions: give one action text per round, e.g. --actions 'move left' 'grow' or --actions-file")
    if scale < 1:
        raise PandoraError(f"--scale {scale}: the upscale of the written video must be >= 1")
    picture = open_image(image, f"start image '{image}'")  # the cheap checks first, before the model loads
    where = resolve_device(device)
    model = load_model(checkpoint, adapter, where, precision)
    start, note = fit_start_image(picture, model.cfg.generator.size, resize, f"start image '{image}'")
    if note:
        print(f"start image: {note}")
    session = Session(model, from_numpy(start).to(where), seed=seed, check_action=check_action)
    with autocast(model.precision, where):
        for round_, action in enumerate(tqdm(actions, desc="generate", unit="round"), 1):
            try:
                session.step(action)
            except PandoraError as err:
                raise PandoraError(f"round {round_} ('{action}'): {err}") from None
    return write_episode(out_dir, to_numpy(session.frames), session.actions, model.cond_frames, model.new_frames, scale)
