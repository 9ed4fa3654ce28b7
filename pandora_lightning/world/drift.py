"""The ground-truth PSNR a rollout keeps when it draws exactly but lands slightly off: a baseline for drift.

A rollout's round starts from where the last one ended, so position errors add up. Against the ground
truth, a model that draws every frame exactly but misses each round's end position by a small random
amount loses PSNR from round to round however small the miss: with hard-edged objects the squared
error grows with the offset, and the offset of round r is a sum of r misses. `exact_drawer_psnr`
measures that on the world's own episodes, which is why the benchmark also scores PSNR against the
state each frame shows (`metrics.StateFidelity`, "psnr_at_state"): drawing alone.

    python -m pandora_lightning.world.drift 0.05 0.1 0.2    # per-round misses in px
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import numpy as np

from pandora_lightning.world.domains import DOMAINS, get_domain
from pandora_lightning.world.simulator import Episode, WorldConfig, render_states, sample_episode


def exact_drawer_psnr(episodes: Sequence[Episode], miss_px: float, cfg: WorldConfig, seed: int = 0) -> np.ndarray:
    """Per-round PSNR (dB, of the mean squared error over all episodes' frames of the round) of rollouts
    that follow each episode's own states, except that every round adds a miss of N(0, miss_px) px in x
    and y and N(0, miss_px / 2) in radius, spread evenly over the round's frames and carried into the
    rounds after it. Episodes must have the same number of rounds."""
    rng = np.random.default_rng(seed)
    c, f = cfg.cond_frames, cfg.round_frames
    rounds = (len(episodes[0].states) - c) // f
    squared = np.zeros(rounds)
    for ep in episodes:
        misses = rng.normal(0.0, 1.0, (rounds, 3)) * np.array([miss_px, miss_px, miss_px / 2])
        ends = np.cumsum(misses, axis=0)
        starts = np.vstack([np.zeros(3), ends[:-1]])
        states = list(ep.states[:c])
        for r in range(rounds):
            for j in range(f):
                dx, dy, dr = starts[r] + (ends[r] - starts[r]) * (j + 1) / f
                s = ep.states[c + r * f + j]
                states.append(dataclasses.replace(s, x=s.x + dx, y=s.y + dy, radius=max(0.5, s.radius + dr)))
        drawn = render_states(get_domain(ep.domain), states, cfg.image_size).astype(np.float64)
        error = (drawn[c:] - ep.frames[c:].astype(np.float64)) ** 2
        squared += error.reshape(rounds, -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(255.0**2 / (squared / len(episodes)))


def main(argv: Sequence[str]) -> None:
    cfg = WorldConfig(held_out_rounds=8)
    rng = np.random.default_rng(0)
    episodes = [sample_episode(cfg, d, rng, split="val") for d in DOMAINS for _ in range(24)]
    for miss in map(float, argv or ["0.05", "0.1", "0.2"]):
        psnr = exact_drawer_psnr(episodes, miss, cfg)
        print(f"miss {miss} px a round: PSNR by round {' '.join(f'{v:.1f}' for v in psnr)}; "
              f"round 1 -> 3: -{psnr[0] - psnr[2]:.2f} dB")


if __name__ == "__main__":
    main(sys.argv[1:])
