"""The multi-round rollout loop, one round at a time.

A `Rollout` holds B episodes in flight: the frames so far and each episode's noise generator.
`step` takes one action per episode and renders the next round, so an action can depend on what
the previous round showed (a session). `rollout` runs a whole list of rounds at once.
"""
from __future__ import annotations

import torch

from pandora_lightning.models.world_model import WorldModel


class Rollout:
    """B episodes rolled out together from their start frames; frames are (B, T, 3, H, W) in [-1, 1]."""

    def __init__(self, model: WorldModel, start: torch.Tensor, seed: int = 0):
        """start (B, 3, H, W): the first frame, given `model.cond_frames` times.

        Episode b draws its noise from seed + b, so its frames do not depend on the batch it ran in.
        """
        self.model = model
        self.rng = [torch.Generator().manual_seed(seed + b) for b in range(start.shape[0])]
        self.video = start.unsqueeze(1).expand(-1, model.cond_frames, -1, -1, -1)

    @property
    def batch_size(self) -> int:
        return self.video.shape[0]

    @torch.no_grad()
    def step(self, texts: list[str]) -> torch.Tensor:
        """One round: texts[b] is episode b's action. Returns the new frames (B, F, 3, H, W)."""
        if len(texts) != self.batch_size:
            raise ValueError(f"a round needs one action text per episode ({self.batch_size}), got {len(texts)}")
        model, n = self.model, self.model.cond_frames
        given = self.video[:, -n:]
        uncond = None
        if not model.generator.needs_uncond_context:
            context = model.context(given, texts)
        else:  # the text and the empty text through the encoders in one batch
            context, uncond = model.context(torch.cat([given, given]), [*texts, *[""] * len(texts)]).chunk(2)
        # frames [0, n) of a family's clip are its rendering of the given ones: keep the new frames
        clip = model.generator.sample(given, context, generator=self.rng, uncond_context=uncond)[:, n:]
        self.video = torch.cat([self.video, clip], dim=1)
        return clip


def rollout(model: WorldModel, start: torch.Tensor, actions: list[list[str]], seed: int = 0) -> torch.Tensor:
    """Generate round after round; actions[r][b] is episode b's action in round r.

    start (B, 3, H, W) -> (B, Tc + R * F, 3, H, W): the start frame repeated Tc times, then the F
    new frames of each round; round r > 1 is conditioned on the last Tc frames so far.
    """
    if not actions or any(len(a) != start.shape[0] for a in actions):
        raise ValueError(
            f"rollout needs one list of {start.shape[0]} action texts per round; got {[len(a) for a in actions]} "
            f"(an empty action list generates nothing)"
        )
    episodes = Rollout(model, start, seed)
    for texts in actions:
        episodes.step(texts)
    return episodes.video
