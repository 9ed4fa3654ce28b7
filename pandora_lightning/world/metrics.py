"""Ground-truth metrics of the built-in world: action following and temporal consistency.

Both read rollouts laid out as the model generates them: `cond_frames` given frames (the start
state), then `round_frames` new frames per round, round r steered by episode["actions"][r].
An episode is the world's shard JSON: {"domain", "actions": [{"action": canonical name, ...}]}.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pandora_lightning.evaluation.metrics.base import DomainMetric, check_video, to_uint8_frames
from pandora_lightning.world import ACTIONS, DOMAINS, classify_round, frame_consistency, get_domain, measure_states

ACTION_NAMES = tuple(ACTIONS)


class _RoundMetric(DomainMetric):
    """States per (domain, round); updates walk each rollout round by round."""

    def __init__(
        self, cond_frames: int, round_frames: int, domains: Sequence[str] = tuple(DOMAINS), max_rounds: int = 64, **kwargs
    ):
        super().__init__(domains, **kwargs)
        if cond_frames < 1 or round_frames < 1:
            raise ValueError(f"cond_frames={cond_frames} and round_frames={round_frames} must be >= 1")
        self.cond_frames, self.round_frames, self.max_rounds = cond_frames, round_frames, max_rounds

    def rounds(self, videos: torch.Tensor, episodes: Sequence[dict]):
        """Yield (domain index, domain, uint8 frames (T, H, W, 3), number of rounds, episode) per video."""
        check_video(videos, "videos")
        if len(episodes) != videos.shape[0]:
            raise ValueError(f"got {len(episodes)} episodes for {videos.shape[0]} videos")
        frames = to_uint8_frames(videos).numpy()
        index = self.domain_index([ep["domain"] for ep in episodes], len(episodes)).tolist()
        for g, video, ep in zip(index, frames, episodes):
            n = min(len(ep["actions"]), (len(video) - self.cond_frames) // self.round_frames)
            if n > self.max_rounds:
                raise ValueError(f"a rollout has {n} rounds, more than max_rounds={self.max_rounds}")
            yield g, get_domain(ep["domain"]), video, n, ep

    def span(self, r: int) -> slice:
        begin = self.cond_frames + r * self.round_frames
        return slice(begin, begin + self.round_frames)


class ActionFollowing(_RoundMetric):
    """Share of rounds whose generated motion is the action that was given.

    Each round is classified (`world.classify_round`) among all of its domain's actions from the
    object measured in the frames; a round whose object cannot be found counts as wrong. Also
    keeps a confusion matrix: confusion[given, classified], last column = object not found.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        shape = (len(self.domains), self.max_rounds)
        self.add_state("correct", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        a = len(ACTION_NAMES)
        self.add_state("confusion", torch.zeros(a, a + 1, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, videos: torch.Tensor, episodes: Sequence[dict]) -> None:
        """videos (B, T, 3, H, W) uint8 or float in [-1, 1]; episodes: B world episode dicts."""
        correct = np.zeros(tuple(self.correct.shape))
        total = np.zeros_like(correct)
        confusion = np.zeros(tuple(self.confusion.shape))
        for g, domain, video, n, ep in self.rounds(videos, episodes):
            cond, size = self.cond_frames, video.shape[1]
            for r in range(n):
                s = self.span(r)
                clip = video[s.start - cond : s.stop]
                predicted = classify_round(clip, domain, size, cond, domain.actions)
                target = ep["actions"][r]["action"]
                correct[g, r] += predicted == target
                total[g, r] += 1
                column = ACTION_NAMES.index(predicted) if predicted is not None else len(ACTION_NAMES)
                confusion[ACTION_NAMES.index(target), column] += 1
        self.correct += torch.from_numpy(correct).to(self.correct)
        self.total += torch.from_numpy(total).to(self.total)
        self.confusion += torch.from_numpy(confusion).to(self.confusion)

    def compute(self) -> dict[str, torch.Tensor]:
        rounds = int((self.total.sum(0) > 0).sum())
        return {
            "action_following": self.correct.sum() / self.total.sum(),
            "action_following/per_domain": self.correct.sum(1) / self.total.sum(1),
            "action_following/per_round": self.correct.sum(0)[:rounds] / self.total.sum(0)[:rounds],
            "action_following/count": self.total.sum(),
        }

    def domain_counts(self) -> torch.Tensor:
        return self.total.sum(1)

    def report(self) -> dict[str, dict]:
        out = super().report()
        out["action_following"]["confusion"] = self.confusion_table()
        return out

    def confusion_table(self) -> dict[str, dict[str, int]]:
        """{given action: {classified action or "not_found": rounds}} (non-zero cells only)."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            table = self.confusion.detach().cpu()
        columns = (*ACTION_NAMES, "not_found")
        return {
            given: {c: int(v) for c, v in zip(columns, row) if v > 0}
            for given, row in zip(ACTION_NAMES, table)
            if row.sum() > 0
        }


class TemporalConsistency(_RoundMetric):
    """Object identity and background kept across generated frames and rounds (`world.frame_consistency`).

    "temporal_object": share of generated frames that keep the start state's object (found, same
    colour, compact shape); "temporal_background": mean share of background pixels kept; both per
    domain and per round, so drift over a long rollout shows in the per-round values.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        shape = (len(self.domains), self.max_rounds)
        for name in ("object_sum", "background_sum", "frames"):
            self.add_state(name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, videos: torch.Tensor, episodes: Sequence[dict]) -> None:
        """videos (B, T, 3, H, W) uint8 or float in [-1, 1]; episodes: B world episode dicts."""
        obj = np.zeros(tuple(self.frames.shape))
        bg, frames = np.zeros_like(obj), np.zeros_like(obj)
        for g, domain, video, n, _ in self.rounds(videos, episodes):
            size = video.shape[1]
            reference = measure_states(video[self.cond_frames - 1 : self.cond_frames], domain, size)[0]
            end = self.span(n - 1).stop if n else self.cond_frames
            kept, background = frame_consistency(video[self.cond_frames : end], domain, size, reference)
            for r in range(n):
                s = slice(r * self.round_frames, (r + 1) * self.round_frames)
                obj[g, r] += kept[s].sum()
                bg[g, r] += background[s].sum()
                frames[g, r] += self.round_frames
        self.object_sum += torch.from_numpy(obj).to(self.object_sum)
        self.background_sum += torch.from_numpy(bg).to(self.background_sum)
        self.frames += torch.from_numpy(frames).to(self.frames)

    def compute(self) -> dict[str, torch.Tensor]:
        rounds = int((self.frames.sum(0) > 0).sum())
        out = {}
        for name, total in (("temporal_object", self.object_sum), ("temporal_background", self.background_sum)):
            out[name] = total.sum() / self.frames.sum()
            out[f"{name}/per_domain"] = total.sum(1) / self.frames.sum(1)
            out[f"{name}/per_round"] = total.sum(0)[:rounds] / self.frames.sum(0)[:rounds]
            out[f"{name}/count"] = self.frames.sum()
        return out

    def domain_counts(self) -> torch.Tensor:
        return self.frames.sum(1)


class WorldMetrics:
    """The built-in world's metrics as an evaluation plugin (`evaluation.suite.EpisodeMetrics`):
    pass `WORLD_METRICS` to `run_score`, `ScoreCallback` or `MetricSuite`."""

    names = ("action_following", "temporal_object", "temporal_background")

    def why_not(self, episodes) -> str | None:
        ours = all(
            meta.get("source") == "world" and meta.get("domain") in DOMAINS and all("action" in a for a in meta["actions"])
            for _, _, meta in episodes
        )
        return None if ours else "the samples are not built-in world episodes (source 'world' with canonical actions)"

    def build(self, cond: int, new: int, domains: list[str]) -> dict[str, DomainMetric]:
        return {"action_following": ActionFollowing(cond, new, domains), "temporal": TemporalConsistency(cond, new, domains)}


WORLD_METRICS = WorldMetrics()
