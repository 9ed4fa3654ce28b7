"""PSNR and SSIM of generated against ground-truth videos, per frame, per round and per domain.

Each frame is scored on its own (torchmetrics' functional PSNR/SSIM over (3, H, W), data range
1 after mapping both videos to [0, 1]); the headline value is the mean over every scored frame.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from pandora_lightning.evaluation.metrics.base import DomainMetric, check_video, to_unit


class PerFrameVideoMetric(DomainMetric):
    """Sums a per-frame score into (G, max_frames) states.

    `frames_per_round` (optional) also reports the mean of each run of that many frames, i.e. one
    value per rollout round when the videos passed in are the generated frames only.
    """

    name: str

    def __init__(
        self, domains: Sequence[str] = (), frames_per_round: int | None = None, max_frames: int = 256, **kwargs
    ):
        super().__init__(domains, **kwargs)
        if frames_per_round is not None and frames_per_round < 1:
            raise ValueError(f"frames_per_round={frames_per_round} must be >= 1 (or None)")
        self.frames_per_round, self.max_frames = frames_per_round, max_frames
        g = len(self.domains)
        self.add_state("total", torch.zeros(g, max_frames, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(g, max_frames, dtype=torch.float64), dist_reduce_fx="sum")

    def frame_scores(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] twice -> (N,) scores."""
        raise NotImplementedError

    def update(self, preds: torch.Tensor, target: torch.Tensor, domains: Sequence[str] | None = None) -> None:
        """preds, target: (B, T, 3, H, W), uint8 or float in [-1, 1]; domains: B names (None: one domain)."""
        check_video(preds, "preds")
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} must have the same shape")
        b, t = preds.shape[:2]
        if t > self.max_frames:
            raise ValueError(f"videos have {t} frames, more than max_frames={self.max_frames}")
        scores = self.frame_scores(to_unit(preds).flatten(0, 1), to_unit(target).flatten(0, 1)).view(b, t)
        index = self.domain_index(domains, b)
        self.total[:, :t].index_add_(0, index, scores.to(self.total))
        self.count[:, :t].index_add_(0, index, torch.ones_like(scores, dtype=self.count.dtype))

    def compute(self) -> dict[str, torch.Tensor]:
        frames = int((self.count.sum(0) > 0).sum())
        total, count = self.total[:, :frames], self.count[:, :frames]
        out = {
            self.name: total.sum() / count.sum(),
            f"{self.name}/per_frame": total.sum(0) / count.sum(0),
            f"{self.name}/per_domain": total.sum(1) / count.sum(1),
            f"{self.name}/count": count.sum(),
        }
        if self.frames_per_round:
            rounds = -(-frames // self.frames_per_round)
            pad = rounds * self.frames_per_round - frames
            per_round = torch.nn.functional.pad(torch.stack([total.sum(0), count.sum(0)]), (0, pad))
            per_round = per_round.view(2, rounds, self.frames_per_round).sum(-1)
            out[f"{self.name}/per_round"] = per_round[0] / per_round[1]
        return out

    def domain_counts(self) -> torch.Tensor:
        return self.count.sum(1)


class VideoPSNR(PerFrameVideoMetric):
    """Peak signal-to-noise ratio in dB per frame (identical frames give +inf)."""

    name = "psnr"

    def frame_scores(self, preds, target):
        return peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3))


class VideoSSIM(PerFrameVideoMetric):
    """Structural similarity per frame (Gaussian window 11, sigma 1.5; frames need H, W >= 11)."""

    name = "ssim"

    def frame_scores(self, preds, target):
        if min(preds.shape[-2:]) < 11:
            raise ValueError(f"SSIM needs frames of at least 11x11 pixels, got {tuple(preds.shape[-2:])}")
        return structural_similarity_index_measure(preds, target, data_range=1.0, reduction="none")
