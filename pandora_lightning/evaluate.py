"""Roll the model out from held-out world start states and score action following per domain."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pandora_lightning.data.dataset import iterate_split
from pandora_lightning.data.manifest import Manifest
from pandora_lightning.data.video import contact_sheet, save_png, write_mp4
from pandora_lightning.models.world_model import WorldModel
from pandora_lightning.world import ActionFollowing, classify_round, get_domain


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(B, T, 3, H, W) in [-1, 1] -> (B, T, H, W, 3) uint8."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3).float() / 127.5 - 1


def score_rounds(video: np.ndarray, meta: dict, cond_frames: int, new_frames: int, tally: ActionFollowing) -> None:
    """Classify each generated round of one rollout (T, H, W, 3) against the action it was given."""
    domain = get_domain(meta["domain"])
    for r, span in enumerate(meta["actions"]):
        begin = cond_frames + r * new_frames
        clip = video[begin - cond_frames : begin + new_frames]
        predicted = classify_round(clip, domain, meta["image_size"], cond_frames, domain.actions)
        tally.update(meta["domain"], predicted, span["action"])


def evaluate_split(
    model: WorldModel, manifest: Manifest, split: str, limit: int, batch_size: int, out_dir: Path | None, seed: int = 0
) -> ActionFollowing:
    """Roll out up to `limit` episodes per domain of `split` with their own actions, one per round.

    Writes an mp4 per rollout and a contact sheet (ground truth above generation) per batch
    into out_dir when given.
    """
    tally = ActionFollowing()
    episodes = list(iterate_split(manifest, split, per_domain=limit))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    cond, new = model.cond_frames, model.new_frames
    for first in range(0, len(episodes), batch_size):
        chunk = episodes[first : first + batch_size]
        start = to_tensor(np.stack([frames[0] for _, frames, _ in chunk]))
        rounds = min(len(meta["actions"]) for _, _, meta in chunk)
        actions = [[meta["actions"][r]["text"] for _, _, meta in chunk] for r in range(rounds)]
        videos = to_uint8(model.rollout(start, actions, seed=seed + first))
        for video, (key, frames, meta) in zip(videos, chunk):
            meta = {**meta, "actions": meta["actions"][:rounds]}
            score_rounds(video, meta, cond, new, tally)
            if out_dir is not None:
                write_mp4(out_dir / f"{key}.mp4", video, fps=meta.get("fps", 8), scale=4)
        if out_dir is not None:
            rows = [r for (_, frames, _), video in zip(chunk, videos) for r in (frames[: len(video)], video)]
            save_png(out_dir / f"{split}-sheet-{first // batch_size:03d}.png", contact_sheet(rows, scale=3))
    return tally
