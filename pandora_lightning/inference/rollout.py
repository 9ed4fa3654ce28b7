"""Many episodes rolled out together, one round at a time: a batch of `Session`s.

`Rollout` holds B sessions stepped in one batched model call per round (episode b seeded by
seed + b, so its frames do not depend on the batch it ran in); `rollout` runs a whole list of
rounds at once. A model with history reads the earlier rounds through its cache.
"""
from __future__ import annotations

import torch

from pandora_lightning.errors import PandoraError
from pandora_lightning.inference.session import Session, step_sessions
from pandora_lightning.models.world_model import WorldModel


class Rollout:
    """B episodes rolled out together from their start frames; frames are (B, T, 3, H, W) in [-1, 1]."""

    def __init__(self, model: WorldModel, start: torch.Tensor, seed: int = 0, **session_options):
        """start (B, 3, H, W): the first frame, given `model.cond_frames` times. session_options: see `Session`."""
        self.model = model
        self.sessions = [Session(model, frame, seed=seed + b, **{"strict": False, **session_options}) for b, frame in enumerate(start)]

    @property
    def batch_size(self) -> int:
        return len(self.sessions)

    @property
    def video(self) -> torch.Tensor:
        return torch.stack([s.frames for s in self.sessions])

    def step(self, texts: list[str]) -> torch.Tensor:
        """One round: texts[b] is episode b's action. Returns the new frames (B, F, 3, H, W)."""
        if len(texts) != self.batch_size:
            raise PandoraError(f"a round needs one action text per episode ({self.batch_size}), got {len(texts)}")
        return torch.stack(step_sessions(self.sessions, texts))


def rollout(model: WorldModel, start: torch.Tensor, actions: list[list[str]], seed: int = 0, **session_options) -> torch.Tensor:
    """Generate round after round; actions[r][b] is episode b's action in round r.

    start (B, 3, H, W) -> (B, Tc + R * F, 3, H, W): the start frame repeated Tc times, then the F
    new frames of each round; round r > 1 is conditioned on the last Tc frames so far.
    """
    if not actions or any(len(a) != start.shape[0] for a in actions):
        raise PandoraError(
            f"rollout needs one list of {start.shape[0]} action texts per round; got {[len(a) for a in actions]} "
            f"(an empty action list generates nothing)"
        )
    episodes = Rollout(model, start, seed, **session_options)
    for texts in actions:
        episodes.step(texts)
    return episodes.video
