"""The one rollout-and-score loop, shared by `score`, the fit-time scoring callback and the demo:
held-out episodes -> batched multi-round rollouts -> a `MetricSuite` (and, if asked, media)."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pandora_lightning.data.dataset import iterate_split
from pandora_lightning.data.frames import from_numpy, to_numpy
from pandora_lightning.data.manifest import Manifest
from pandora_lightning.data.tar import printable, safe_key
from pandora_lightning.data.video import contact_sheet, save_png, write_mp4
from pandora_lightning.errors import PandoraError
from pandora_lightning.evaluation.suite import Episode, MetricSuite
from pandora_lightning.inference.rollout import rollout
from pandora_lightning.models.world_model import WorldModel


# (model, start (B, 3, H, W), actions[r][b], seed) -> (B, Tc + R * F, 3, H, W), all in [-1, 1]
RolloutFn = Callable[[WorldModel, torch.Tensor, list[list[str]], int], torch.Tensor]


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


def load_episodes(
    manifest: Manifest, split: str, per_domain: int | None, size: tuple[int, int], skipped: list | None = None
) -> list[Episode]:
    """Up to `per_domain` episodes of each domain of `split`, checked against the model's frame size;
    corrupt samples are skipped and appended to `skipped` as ("shard:key", reason)."""
    skipped = [] if skipped is None else skipped
    episodes = list(iterate_split(manifest, split, per_domain=per_domain or None, skipped=skipped))
    if not episodes:
        corrupt = f" ({len(skipped)} corrupt: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise PandoraError(f"manifest {manifest.path}: split '{split}' has no samples to score{corrupt}")
    silent = [key for key, _, meta in episodes if not meta.get("actions")]
    if silent:
        raise PandoraError(
            f"manifest {manifest.path}: {len(silent)} of the {len(episodes)} '{split}' samples read have no action texts "
            f"(e.g. {printable(silent[0])}); scoring rolls each episode out one action per round, so its clips need "
            f"actions (the `actions` column of `shards build`), or score another split (--split)"
        )
    key, frames, _ = episodes[0]
    if tuple(frames.shape[1:3]) != tuple(size):
        raise PandoraError(
            f"manifest {manifest.path}: sample {key} is {frames.shape[1]}x{frames.shape[2]} (height x width) but the "
            f"checkpoint generates {size[0]}x{size[1]} frames"
        )
    return episodes


def rollout_batches(
    model: WorldModel, episodes: Sequence[Episode], batch_size: int, seed: int = 0, rollout_fn: RolloutFn = rollout
) -> Iterator[RolloutBatch]:
    """Roll every episode out from its first frame with its own action texts, one per round.

    A batch runs as many rounds as its shortest episode has actions; episode i's noise comes from
    seed + i (the rollout seeds each sample apart), so results do not depend on the batch size.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    for first in range(0, len(episodes), batch_size):
        chunk = episodes[first : first + batch_size]
        start = from_numpy(np.stack([frames[0] for _, frames, _ in chunk])).to(device)
        rounds = min(len(meta["actions"]) for _, _, meta in chunk)
        if rounds < 1:
            raise PandoraError(f"episode {chunk[0][0]} (or another in its batch) has no actions to roll out")
        actions = [[meta["actions"][r]["text"] for _, _, meta in chunk] for r in range(rounds)]
        yield RolloutBatch(
            index=first // batch_size,
            first=first,
            keys=[key for key, _, _ in chunk],
            truth=[frames for _, frames, _ in chunk],
            episodes=[{**meta, "actions": meta["actions"][:rounds]} for _, _, meta in chunk],
            videos=rollout_fn(model, start, actions, seed + first),
            rounds=rounds,
        )


def write_media(batch: RolloutBatch, out_dir: Path, name: str, fps: int = 8) -> None:
    """An mp4 per rollout and one contact sheet per batch (ground truth row above generation)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    videos = to_numpy(batch.videos)
    for key, video, ep in zip(batch.keys, videos, batch.episodes):
        write_mp4(out_dir / f"{safe_key(key)}.mp4", video, fps=ep.get("fps", fps), scale=4)  # keys come from shards
    rows = [r for truth, video in zip(batch.truth, videos) for r in (truth[: len(video)], video)]
    save_png(out_dir / f"{safe_key(name)}-sheet-{batch.index:03d}.png", contact_sheet(rows, scale=3))


def run_episodes(
    model: WorldModel,
    episodes: Sequence[Episode],
    suite: MetricSuite,
    batch_size: int,
    seed: int = 0,
    media_dir: Path | None = None,
    name: str = "rollouts",
    rollout_fn: RolloutFn = rollout,
    progress: str | None = None,
) -> int:
    """Roll `episodes` out and update `suite`; writes media into `media_dir` when given. Returns the rounds
    generated. `progress`: the label of a progress bar (episodes done) on stderr."""
    rounds = 0
    bar = tqdm(total=len(episodes), unit="episode", desc=progress, disable=progress is None)
    with torch.no_grad(), bar:
        for batch in rollout_batches(model, episodes, batch_size, seed, rollout_fn):
            bar.update(len(batch.keys))
            suite.update(batch.videos, batch.truth, batch.episodes)
            rounds += batch.rounds * len(batch.keys)
            if media_dir is not None:
                write_media(batch, media_dir, name)
    return rounds
