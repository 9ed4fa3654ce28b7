"""Ground-truth metrics of the built-in world: action following and temporal consistency.

Both read rollouts laid out as the model generates them: `cond_frames` given frames (the start
state), then `round_frames` new frames per round, round r steered by episode["actions"][r].
An episode is the world's shard JSON: {"domain", "actions": [{"action": canonical name, ...}]}.
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from torchmetrics.utilities import dim_zero_cat

from pandora_lightning.evaluation.metrics.base import DomainMetric, check_video, to_uint8_frames
from pandora_lightning.evaluation.metrics.interval import bootstrap_interval
from pandora_lightning.world.baseline import best_baseline, predictor_accuracies, valid_sets
from pandora_lightning.world.domains import ACTIONS, DOMAINS, get_domain
from pandora_lightning.world.measure import frame_consistency, judge_round, measure_states, state_from_row
from pandora_lightning.world.history import HISTORY_ACTIONS
from pandora_lightning.world.simulator import SPLITS, held_out_actions, render_states

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


# Columns of ActionFollowing's per-round records (float64 rows, concatenated across processes).
_COLUMNS = ("episode", "domain", "round", "action", "previous", "valid", "strict", "lenient", "classified",
            "kept", "held_out", "refers", "back")
# Rounds said as a reference to the previous one ("again", "go back"; world/history.py) are scored
# against the action they resolve to; "refers" is 1 + the kind's index, 0 for a plain round, and
# "back" how many rounds back the last plainly said action is (0 for a plain round): a chain of
# references reaching beyond the rounds a model reads can only be followed from what it saw.
HISTORY_KINDS = tuple(HISTORY_ACTIONS)
_C = {name: i for i, name in enumerate(_COLUMNS)}


def episode_id(episode: dict) -> int:
    """A stable id of an episode (CRC-32 of its JSON): rounds of one episode are resampled together."""
    return zlib.crc32(json.dumps(episode, sort_keys=True, default=str).encode())


def _mask(actions: Sequence[str] | None) -> int:
    return -1 if actions is None else sum(1 << ACTION_NAMES.index(a) for a in actions)


def _unmask(mask: int) -> tuple[str, ...] | None:
    return None if mask < 0 else tuple(a for i, a in enumerate(ACTION_NAMES) if mask >> i & 1)


class ActionFollowing(_RoundMetric):
    """Share of rounds that did what the action says, strictly and leniently, beside the true chance.

    strict ("action_following", the headline): the object is found and kept in every frame of the
    round, and its change over the round (position, radius) is within ``RATE_TOLERANCE`` of the
    commanded change (`world.judge_round`). lenient ("action_following_lenient"): the nearest of the
    domain's candidate trajectories is the given action (`world.classify_round`), which credits any
    motion in the right direction. Each comes with a 95% bootstrap interval over episodes and the
    best text-ignoring, state-aware baseline on the same rounds (`world.baseline`);
    "action_following_held_out" repeats the strict figure on rounds whose action the domain never
    showed in training (the transfer split). Keeps one record per round, so the report can resample.
    """

    def __init__(self, *args, interval_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.interval_seed = interval_seed
        self.add_state("records", [], dist_reduce_fx="cat")

    def update(self, videos: torch.Tensor, episodes: Sequence[dict]) -> None:
        """videos (B, T, 3, H, W) uint8 or float in [-1, 1]; episodes: B world episode dicts."""
        rows = []
        for g, domain, video, n, ep in self.rounds(videos, episodes):
            cond, size = self.cond_frames, video.shape[1]
            reference = measure_states(video[cond - 1 : cond], domain, size)[0]
            valid = valid_sets(ep, n)
            held = held_out_actions(ep["domain"], ep["split"]) if ep.get("split") in SPLITS else ()
            uid, previous, plain = episode_id(ep), -1, -1
            for r in range(n):
                s = self.span(r)
                target = ep["actions"][r]["action"]
                verdict = judge_round(video[s.start - cond : s.stop], domain, size, cond, target, reference, domain.actions)
                classified = -1 if verdict.lenient is None else ACTION_NAMES.index(verdict.lenient)
                action = ACTION_NAMES.index(target)
                refers = ep["actions"][r].get("refers")
                said = refers in HISTORY_KINDS
                plain = plain if said else r
                rows.append([uid, g, r, action, previous, _mask(None if valid is None else valid[r]), verdict.strict,
                             verdict.lenient == target, classified, verdict.found and verdict.kept, target in held,
                             HISTORY_KINDS.index(refers) + 1 if said else 0, r - plain])
                previous = action
        if rows:
            self.records.append(torch.tensor(rows, dtype=torch.float64, device=self.device))

    def _table(self) -> np.ndarray:
        records = self.records
        if isinstance(records, torch.Tensor):
            return records.detach().cpu().numpy().reshape(-1, len(_COLUMNS))
        if not records:
            return np.zeros((0, len(_COLUMNS)))
        return dim_zero_cat(records).detach().cpu().numpy()

    def compute(self) -> dict[str, torch.Tensor]:
        table = self._table()
        share = float(table[:, _C["strict"]].mean()) if len(table) else float("nan")
        history = {f"action_following/{k}": torch.tensor(v, dtype=torch.float64) for k, v in self._history(table, "strict").items()}
        return {"action_following": torch.tensor(share, dtype=torch.float64), **history}

    @staticmethod
    def _history(table: np.ndarray, column: str) -> dict[str, float]:
        """Shares (``column``: "strict" or "lenient") of rounds said as "again"/"go back" and of the
        other rounds; empty without any. The lenient one tells a model that forgot the previous action
        from one that remembered it but drew the round badly; "back_<d>" (and its count) splits the
        said rounds by how far back the action said plainly is, which tells a window too short."""
        refers, hits = table[:, _C["refers"]], table[:, _C[column]]
        said = refers > 0
        if not said.any():
            return {}
        out = {"history": float(hits[said].mean()), "history_count": float(said.sum())}
        out["plain"] = float(hits[~said].mean()) if (~said).any() else float("nan")
        for i, kind in enumerate(HISTORY_KINDS):
            if (refers == i + 1).any():
                out[kind] = float(hits[refers == i + 1].mean())
        back = table[:, _C["back"]].astype(int)
        for d in np.unique(back[said]):
            rounds = said & (back == d)
            out[f"back_{d}"], out[f"back_{d}_count"] = float(hits[rounds].mean()), float(rounds.sum())
        return out

    def domain_counts(self) -> torch.Tensor:
        table = self._table()
        return torch.from_numpy(np.bincount(table[:, _C["domain"]].astype(int), minlength=len(self.domains)).astype(np.float64))

    def report(self) -> dict[str, dict]:
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            table = self._table()
        if not len(table):
            return {}
        contexts = [
            {"episode": int(row[_C["episode"]]), "domain": int(row[_C["domain"]]), "action": int(row[_C["action"]]),
             "previous": int(row[_C["previous"]]), "valid": _unmask(int(row[_C["valid"]]))}
            for row in table
        ]
        for c in contexts:  # the predictors compare action names with the valid sets
            c["action"] = ACTION_NAMES[c["action"]]
        chance = predictor_accuracies(contexts)
        out = {
            "action_following": self._entry(table, "strict", chance, np.ones(len(table), bool)),
            "action_following_lenient": self._entry(table, "lenient", chance, np.ones(len(table), bool)),
        }
        out["action_following"]["confusion"] = self._confusion(table)
        out["action_following"].update(self._history(table, "strict"))
        out["action_following_lenient"].update(self._history(table, "lenient"))
        held = table[:, _C["held_out"]] > 0
        if held.any():
            out["action_following_held_out"] = self._entry(table, "strict", chance, held)
        return out

    def _entry(self, table: np.ndarray, column: str, chance: dict, mask: np.ndarray) -> dict:
        """overall, per_domain, per_round, count, interval, per_domain_interval and baseline of one share."""
        hits, episodes = table[:, _C[column]], table[:, _C["episode"]]
        domains, rounds = table[:, _C["domain"]].astype(int), table[:, _C["round"]].astype(int)
        entry: dict = {"overall": float(hits[mask].mean()), "count": int(mask.sum())}
        entry["interval"] = bootstrap_interval(hits[mask], episodes[mask], seed=self.interval_seed)
        entry["per_domain"], entry["per_domain_interval"] = {}, {}
        for g, name in enumerate(self.domains):
            sel = mask & (domains == g)
            if sel.any():
                entry["per_domain"][name] = float(hits[sel].mean())
                entry["per_domain_interval"][name] = bootstrap_interval(hits[sel], episodes[sel], seed=self.interval_seed)
        # None for a round without any of the masked rounds (e.g. no held-out action in round 3).
        entry["per_round"] = [float(hits[sel].mean()) if (sel := mask & (rounds == r)).any() else None
                              for r in range(rounds[mask].max() + 1)]
        if chance:
            overall, per_group = best_baseline(chance, domains, mask)
            entry["baseline"] = {
                "overall": float(overall),
                "per_domain": {self.domains[g]: acc for g, (acc, _) in per_group.items()},
                "predictor": {self.domains[g]: name for g, (_, name) in per_group.items()},
            }
        return entry

    def confusion_table(self) -> dict[str, dict[str, int]]:
        """{given action: {classified action (lenient) or "not_found": rounds}} (non-zero cells only)."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            return self._confusion(self._table())

    def _confusion(self, table: np.ndarray) -> dict[str, dict[str, int]]:
        columns = (*ACTION_NAMES, "not_found")
        out: dict[str, dict[str, int]] = {}
        for row in table:
            given = ACTION_NAMES[int(row[_C["action"]])]
            got = columns[int(row[_C["classified"]])]
            out.setdefault(given, {}).setdefault(got, 0)
            out[given][got] += 1
        return out


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


class StateFidelity(_RoundMetric):
    """PSNR of each generated frame against the world's own rendering of the state that frame shows.

    PSNR against the ground truth mixes two things over a rollout: where the object went (which the
    action metrics judge round by round) and how it is drawn. Position errors add up from round to round,
    so a model that draws perfectly but is 0.05 px off per round loses ~4 dB between round 1 and 3
    (`world.drift`): a drop in ground-truth PSNR rewards blurry first rounds. Here the reference is the
    simulator's frame at the generated frame's measured position and size, in the start state's colour,
    so only drawing counts: soft rims, smears, stray blobs and colour drift. A frame in which no object
    is found is compared with the start state's frame; a rollout whose start state shows no object is
    left out. "psnr_at_state" is the PSNR of the mean squared
    error over the frames of a domain and round (uint8 range), in dB, at most 100 (drawn exactly).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        shape = (len(self.domains), self.max_rounds)
        for name in ("squared_error", "frames"):  # the sum of each frame's mean squared error, and the frames
            self.add_state(name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, videos: torch.Tensor, episodes: Sequence[dict]) -> None:
        """videos (B, T, 3, H, W) uint8 or float in [-1, 1]; episodes: B world episode dicts."""
        error, frames = np.zeros(tuple(self.frames.shape)), np.zeros(tuple(self.frames.shape))
        for g, domain, video, n, _ in self.rounds(videos, episodes):
            if not n:
                continue
            size = video.shape[1]
            given = measure_states(video[self.cond_frames - 1 : self.cond_frames], domain, size)[0]
            if np.isnan(given).any():
                continue
            start = state_from_row(given)
            new = video[self.cond_frames : self.span(n - 1).stop]
            shown = [start if np.isnan(row).any() else replace(state_from_row(row), color=start.color)
                     for row in measure_states(new, domain, size)]
            mse = ((new.astype(np.float64) - render_states(domain, shown, size)) ** 2).mean(axis=(1, 2, 3))
            for r in range(n):
                error[g, r] += mse[r * self.round_frames : (r + 1) * self.round_frames].sum()
                frames[g, r] += self.round_frames
        self.squared_error += torch.from_numpy(error).to(self.squared_error)
        self.frames += torch.from_numpy(frames).to(self.frames)

    def compute(self) -> dict[str, torch.Tensor]:
        rounds = int((self.frames.sum(0) > 0).sum())

        def psnr(err: torch.Tensor, count: torch.Tensor) -> torch.Tensor:  # 100 dB: drawn exactly
            return (10 * torch.log10(255.0**2 / (err / count))).clamp(max=100.0)

        return {
            "psnr_at_state": psnr(self.squared_error.sum(), self.frames.sum()),
            "psnr_at_state/per_domain": psnr(self.squared_error.sum(1), self.frames.sum(1)),
            "psnr_at_state/per_round": psnr(self.squared_error.sum(0)[:rounds], self.frames.sum(0)[:rounds]),
            "psnr_at_state/count": self.frames.sum(),
        }

    def domain_counts(self) -> torch.Tensor:
        return self.frames.sum(1)


class WorldMetrics:
    """The built-in world's metrics as an evaluation plugin (`evaluation.suite.EpisodeMetrics`):
    pass `WORLD_METRICS` to `run_score`, `ScoreCallback` or `MetricSuite`."""

    names = ("action_following", "action_following_lenient", "action_following_held_out", "temporal_object",
             "temporal_background", "psnr_at_state")

    def why_not(self, episodes) -> str | None:
        ours = all(
            meta.get("source") == "world" and meta.get("domain") in DOMAINS and all("action" in a for a in meta["actions"])
            for _, _, meta in episodes
        )
        return None if ours else "the samples are not built-in world episodes (source 'world' with canonical actions)"

    def build(self, cond: int, new: int, domains: list[str]) -> dict[str, DomainMetric]:
        return {"action_following": ActionFollowing(cond, new, domains), "temporal": TemporalConsistency(cond, new, domains),
                "fidelity": StateFidelity(cond, new, domains)}


WORLD_METRICS = WorldMetrics()
