"""Which metrics a set of held-out episodes allows, and the door through which a domain brings its own.

The generic metrics (PSNR/SSIM against ground truth, FVD, CLIP score) need only videos, texts and
pretrained feature nets. Metrics that know a domain's dynamics (the built-in world's action
following, say) come in as `EpisodeMetrics` plugins: each says whether the episodes are its kind
and builds its metrics; they are updated with the rollouts and the episodes' shard JSON.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from pandora_lightning.data.frames import from_numpy
from pandora_lightning.evaluation.metrics import (
    ClipEmbedder,
    DomainMetric,
    FrechetVideoDistance,
    TextVideoSimilarity,
    VideoDetector,
    VideoPSNR,
    VideoSSIM,
)

Episode = tuple[str, np.ndarray, dict]  # (key, frames (T, H, W, 3) uint8, shard JSON)


class EpisodeMetrics(Protocol):
    """A domain's own metrics. Each built metric's `update(videos, episodes)` takes the rollouts
    (B, T, 3, H, W) in [-1, 1] and the episodes' shard JSON (actions cut to the rounds generated)."""

    names: tuple[str, ...]  # the report entries it produces (listed as skipped when it does not apply)

    def why_not(self, episodes: Sequence[Episode]) -> str | None:
        """None when the episodes are this plugin's kind; else the reason its metrics are skipped."""

    def build(self, cond: int, new: int, domains: list[str]) -> dict[str, DomainMetric]: ...


def rounds_line_up(episodes: Sequence[Episode], cond: int, new: int) -> bool:
    """Whether each sample's round r spans frames [cond + r*new, cond + (r+1)*new) of its video."""
    return all(
        a["start"] == cond + r * new and a["end"] == a["start"] + new and a["end"] <= len(frames)
        for _, frames, meta in episodes
        for r, a in enumerate(meta["actions"])
    )


class MetricSuite:
    """Every metric the inputs allow for one split; `skipped` maps the others to the reason."""

    def __init__(
        self,
        episodes: Sequence[Episode],
        cond: int,
        new: int,
        detector: VideoDetector | None = None,
        embedder: ClipEmbedder | None = None,
        reasons: dict[str, str] | None = None,
        plugins: Sequence[EpisodeMetrics] = (),
    ):
        self.cond, self.new = cond, new
        self.domains = sorted({meta.get("domain", "") for _, _, meta in episodes})
        self.metrics: dict[str, DomainMetric] = {}
        self.episode_metrics: set[str] = set()  # updated with (videos, episodes)
        self.skipped: dict[str, str] = dict(reasons or {})
        if rounds_line_up(episodes, cond, new):
            self.metrics["psnr"] = VideoPSNR(self.domains, frames_per_round=new)
            self.metrics["ssim"] = VideoSSIM(self.domains, frames_per_round=new)
        else:
            why = f"the samples' action spans do not line up with the model's rounds ({cond} given + {new} new frames)"
            self.skipped["psnr"] = self.skipped["ssim"] = why
        long_enough = all(len(frames) >= cond + len(meta["actions"]) * new for _, frames, meta in episodes)
        if detector is not None and long_enough:
            self.metrics["fvd"] = FrechetVideoDistance(detector, self.domains)
        elif detector is not None:
            self.skipped["fvd"] = "some ground-truth clips are shorter than their rollouts, so there is no real clip to compare"
        if embedder is not None:
            self.metrics["clip_score"] = TextVideoSimilarity(embedder, self.domains)
        for plugin in plugins:
            why = plugin.why_not(episodes)
            if why is None:
                built = plugin.build(cond, new, self.domains)
                self.metrics.update(built)
                self.episode_metrics.update(built)
            else:
                self.skipped.update(dict.fromkeys(plugin.names, why))

    def to(self, device) -> MetricSuite:
        for metric in self.metrics.values():
            metric.to(device)
        return self

    def update(self, videos: torch.Tensor, truth: Sequence[np.ndarray], episodes: Sequence[dict]) -> None:
        """videos (B, T, 3, H, W) in [-1, 1]; truth: ground-truth frames per episode (T_i, H, W, 3) uint8."""
        videos = videos.detach().cpu()  # the metrics' states live on the CPU, whatever device generated the videos
        domains = [ep.get("domain", "") for ep in episodes]
        t = videos.shape[1]
        m = self.metrics
        if "psnr" in m or "fvd" in m:
            real = torch.stack([from_numpy(frames[:t]) for frames in truth]).to(videos.device)
            for name in ("psnr", "ssim"):
                if name in m:
                    m[name].update(videos[:, self.cond :], real[:, self.cond :], domains)
            if "fvd" in m:
                m["fvd"].update(real, real=True, domains=domains)
                m["fvd"].update(videos, real=False, domains=domains)
        if "clip_score" in m:
            texts = [ep.get("caption") or ", then ".join(a["text"] for a in ep["actions"]) for ep in episodes]
            m["clip_score"].update(videos, texts, domains)
        for name in self.episode_metrics:
            m[name].update(videos, episodes)

    def report(self) -> dict[str, dict]:
        out = {}
        for metric in self.metrics.values():
            out.update(metric.report())
        return out

    def scalars(self) -> dict[str, float]:
        return {name: entry["overall"] for name, entry in self.report().items() if entry.get("overall") is not None}


def load_weights(cfg) -> tuple[VideoDetector | None, ClipEmbedder | None, dict[str, str]]:
    """The detector and CLIP model the config names (errors name the file), and why any is missing."""
    reasons = {}
    detector = embedder = None
    if cfg.fvd_detector:
        detector = VideoDetector(cfg.fvd_detector, cfg.fvd_feature_dim)
    else:
        reasons["fvd"] = "no detector given: set fvd_detector to a TorchScript I3D file (e.g. i3d_torchscript.pt)"
    if cfg.clip_model:
        embedder = ClipEmbedder(cfg.clip_model)
    else:
        reasons["clip_score"] = "no CLIP model given: set clip_model to a local CLIP directory (save_pretrained)"
    return detector, embedder, reasons
