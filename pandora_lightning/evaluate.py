"""Roll a model out from held-out episodes in batches (shared by `score`, the fit-time scoring
callback and the demo) and the demo's action-following evaluation."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pandora_lightning.data.dataset import iterate_split
from pandora_lightning.data.manifest import Manifest
from pandora_lightning.data.video import contact_sheet, save_png, write_mp4
from pandora_lightning.metrics.world import ActionFollowing
from pandora_lightning.models.world_model import WorldModel

# (start (B, 3, H, W) in [-1, 1], actions[r][b], seed) -> (B, Tc + R * F, 3, H, W) in [-1, 1]
RolloutFn = Callable[[torch.Tensor, list[list[str]], int], torch.Tensor]
Episode = tuple[str, np.ndarray, dict]  # (key, frames (T, H, W, 3) uint8, shard JSON)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(B, T, 3, H, W) in [-1, 1] -> (B, T, H, W, 3) uint8."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3).float() / 127.5 - 1


@dataclass
class RolloutBatch:
    """One batch of held-out episodes and what the model generated from their start frames."""

    index: int  # batch number within the split
    first: int  # index of the batch's first episode in the split
    keys: list[str]
    truth: list[np.ndarray]  # ground-truth frames per episode, (T_i, H, W, 3) uint8
    episodes: list[dict]  # shard JSON, actions cut to the rounds generated
    videos: torch.Tensor  # (B, Tc + R * F, 3, H, W) in [-1, 1]
    rounds: int


def rollout_batches(
    rollout: RolloutFn, episodes: Sequence[Episode], batch_size: int, seed: int = 0
) -> Iterator[RolloutBatch]:
    """Roll every episode out from its first frame with its own action texts, one per round.

    A batch runs as many rounds as its shortest episode has actions; episode i's noise comes from
    seed + i (the rollout seeds each sample apart), so results do not depend on the batch size.
    """
    for first in range(0, len(episodes), batch_size):
        chunk = episodes[first : first + batch_size]
        start = to_tensor(np.stack([frames[0] for _, frames, _ in chunk]))
        rounds = min(len(meta["actions"]) for _, _, meta in chunk)
        if rounds < 1:
            raise ValueError(f"episode {chunk[0][0]} (or another in its batch) has no actions to roll out")
        actions = [[meta["actions"][r]["text"] for _, _, meta in chunk] for r in range(rounds)]
        videos = rollout(start, actions, seed + first)
        yield RolloutBatch(
            index=first // batch_size,
            first=first,
            keys=[key for key, _, _ in chunk],
            truth=[frames for _, frames, _ in chunk],
            episodes=[{**meta, "actions": meta["actions"][:rounds]} for _, _, meta in chunk],
            videos=videos,
            rounds=rounds,
        )


def model_rollout(model: WorldModel) -> RolloutFn:
    def run(start: torch.Tensor, actions: list[list[str]], seed: int) -> torch.Tensor:
        param = next(model.parameters(), None)
        return model.rollout(start.to(param.device if param is not None else start.device), actions, seed=seed)

    return run


def write_media(batch: RolloutBatch, out_dir: Path, name: str, fps: int = 8) -> None:
    """An mp4 per rollout and one contact sheet per batch (ground truth row above generation)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    videos = to_uint8(batch.videos)
    for key, video, ep in zip(batch.keys, videos, batch.episodes):
        write_mp4(out_dir / f"{key}.mp4", video, fps=ep.get("fps", fps), scale=4)
    rows = [r for truth, video in zip(batch.truth, videos) for r in (truth[: len(video)], video)]
    save_png(out_dir / f"{name}-sheet-{batch.index:03d}.png", contact_sheet(rows, scale=3))


def evaluate_split(
    model: WorldModel, manifest: Manifest, split: str, limit: int, batch_size: int, out_dir: Path | None, seed: int = 0
) -> ActionFollowing:
    """Roll out up to `limit` episodes per domain of `split` and score action following.

    Writes an mp4 per rollout and a contact sheet per batch into out_dir when given.
    """
    metric = ActionFollowing(model.cond_frames, model.new_frames)
    episodes = list(iterate_split(manifest, split, per_domain=limit))
    for batch in rollout_batches(model_rollout(model), episodes, batch_size, seed):
        metric.update(batch.videos.cpu(), batch.episodes)
        if out_dir is not None:
            write_media(batch, out_dir, split)
    return metric
