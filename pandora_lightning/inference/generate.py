"""`generate`: a checkpoint, a start image and one action per round -> an mp4 and a contact sheet."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pandora_lightning.data.frames import from_numpy, to_numpy
from pandora_lightning.data.video import contact_sheet, save_png, write_mp4
from pandora_lightning.errors import PandoraError
from pandora_lightning.inference.rollout import rollout
from pandora_lightning.training.checkpoint import load_stage


def read_start_image(path: str | Path, size: int) -> np.ndarray:
    """A start frame as (H, W, 3) uint8; it must already have the model's size (no silent resizing)."""
    try:
        image = np.asarray(Image.open(path).convert("RGB"))
    except (FileNotFoundError, UnidentifiedImageError) as err:
        raise PandoraError(f"start image '{path}' cannot be read: {err}") from None
    if image.shape[:2] != (size, size):
        raise PandoraError(
            f"start image '{path}' is {image.shape[1]}x{image.shape[0]} but the model generates {size}x{size} "
            f"frames; resize it first (model.generator.image_size in the recipe)"
        )
    return image


def generate(
    checkpoint: str | Path, image: str | Path, actions: list[str], out_dir: Path, seed: int = 0, scale: int = 4
) -> tuple[Path, Path]:
    actions = [a.strip() for a in actions if a.strip()]
    if not actions:
        raise PandoraError("--actions is empty: give one action text per round, e.g. --actions 'move left' 'grow'")
    model = load_stage(checkpoint).model
    cfg = model.cfg.generator
    start = read_start_image(image, cfg.image_size)
    video = to_numpy(rollout(model, from_numpy(start)[None], [[a] for a in actions], seed=seed))[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    video_path, sheet_path = out_dir / "rollout.mp4", out_dir / "rollout.png"
    write_mp4(video_path, video, fps=8, scale=scale)
    # One row per round: its given frames, then what it generated.
    n, f = model.cond_frames, model.new_frames
    rows = [video[r * f : r * f + n + f] for r in range(len(actions))]
    save_png(sheet_path, contact_sheet(rows, scale=scale))
    (out_dir / "actions.txt").write_text("\n".join(actions) + "\n")
    return video_path, sheet_path
