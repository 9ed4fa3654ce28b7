"""Frechet video distance: the Frechet distance between Gaussian fits of detector features of real
and generated clips.

The standard detector is the TorchScript I3D (`i3d_torchscript.pt`, 400 logits a clip) read from a
file the user supplies; nothing is downloaded. It is called as StyleGAN-V does:
`detector(videos (B, 3, T, H, W) in [-1, 1], rescale=False, resize=True, return_features=True)`,
passing only the keyword arguments its `forward` declares, so any TorchScript network that maps
such clips to (B, D) features works (the tests use a small random one).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from pandora_lightning.errors import PandoraError
from pandora_lightning.data.frames import to_model_range
from pandora_lightning.evaluation.metrics.base import DomainMetric, check_video

I3D_FEATURES = 400
_I3D_KWARGS = {"rescale": False, "resize": True, "return_features": True}


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), in float64.

    mu: (D,), sigma: (D, D) symmetric PSD. tr((S1 S2)^1/2) is the sum of the square roots of the
    eigenvalues of S1^1/2 S2 S1^1/2, which is symmetric PSD (same spectrum as S1 S2), so no
    complex matrix square root is needed; rounding negatives are clamped to zero.
    """
    mu1, mu2, sigma1, sigma2 = (x.detach().double() for x in (mu1, mu2, sigma1, sigma2))
    evals, evecs = torch.linalg.eigh(sigma1)
    root1 = (evecs * evals.clamp(min=0).sqrt()) @ evecs.T
    middle = root1 @ sigma2 @ root1
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    # Rounding can leave -1e-15 for identical statistics; the distance itself is never negative.
    return ((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean).clamp(min=0)


class VideoDetector(nn.Module):
    """A frozen TorchScript feature network: (B, T, 3, H, W) videos -> (B, D) float64 features."""

    def __init__(self, path: str | Path, feature_dim: int = I3D_FEATURES):
        super().__init__()
        self.path, self.feature_dim = Path(path), feature_dim
        if not self.path.is_file():
            raise PandoraError(f"FVD detector '{self.path}' does not exist (give a TorchScript I3D file, e.g. i3d_torchscript.pt)")
        try:
            net = torch.jit.load(str(self.path), map_location="cpu")
        except Exception as err:  # a pickle, a zip of something else, junk: all land here
            raise PandoraError(
                f"FVD detector '{self.path}' is not a TorchScript file ({type(err).__name__}: {str(err).splitlines()[0]}); "
                "save the network with torch.jit.save"
            ) from None
        self.net = net.eval()
        for param in self.net.parameters():
            param.requires_grad_(False)
        arguments = {a.name for a in self.net.forward.schema.arguments}
        self.kwargs = {k: v for k, v in _I3D_KWARGS.items() if k in arguments}

    def train(self, mode: bool = True):
        return super().train(False)  # always frozen

    @torch.no_grad()
    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        """videos (B, T, 3, H, W), uint8 or float in [-1, 1] -> (B, feature_dim) float64."""
        check_video(videos, "FVD videos")
        x = to_model_range(videos) if videos.dtype == torch.uint8 else videos.float().clamp(-1, 1)
        try:
            feats = self.net(x.transpose(1, 2).contiguous(), **self.kwargs)
        except Exception as err:
            raise PandoraError(
                f"FVD detector '{self.path}' failed on clips of shape (B, 3, T, H, W)={tuple(x.transpose(1, 2).shape)}: "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            ) from None
        if not isinstance(feats, torch.Tensor) or feats.shape != (videos.shape[0], self.feature_dim):
            shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise PandoraError(
                f"FVD detector '{self.path}' gives features of shape {shape}; expected (batch, {self.feature_dim}) "
                f"(fvd_feature_dim={self.feature_dim}; the standard I3D gives {I3D_FEATURES})"
            )
        return feats.double()


class FrechetVideoDistance(DomainMetric):
    """FVD between the real and the generated videos passed to `update`, overall and per domain.

    Feature sums are kept per domain in float64: (G, D) sums and (G, D, D) outer-product sums for
    each side, so processes can sum them. Covariances are unbiased (N - 1); a side with fewer
    than 2 videos gives NaN. FVD is biased upwards on small sets: compare values at equal N.
    """

    higher_is_better = False

    def __init__(self, detector: VideoDetector, domains: Sequence[str] = (), **kwargs):
        super().__init__(domains, **kwargs)
        self.detector = detector
        g, d = len(self.domains), detector.feature_dim
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(g, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(g, d, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_n", torch.zeros(g, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        videos: torch.Tensor | None,
        real: bool,
        domains: Sequence[str] | None = None,
        features: torch.Tensor | None = None,
    ) -> None:
        """videos (B, T, 3, H, W) uint8 or float in [-1, 1]; real: ground truth (True) or generated.

        `features` (B, D) instead of videos adds features already computed with the detector.
        """
        feats = self.detector(videos.to(self.device)) if features is None else features
        side = "real" if real else "fake"
        index = self.domain_index(domains, feats.shape[0])
        feats = feats.to(self.device, torch.float64)
        getattr(self, f"{side}_sum").index_add_(0, index, feats)
        getattr(self, f"{side}_outer").index_add_(0, index, feats[:, :, None] * feats[:, None, :])
        getattr(self, f"{side}_n").index_add_(0, index, torch.ones_like(index, dtype=torch.float64))

    def _stats(self, side: str, group: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        total, outer, n = (getattr(self, f"{side}_{k}") for k in ("sum", "outer", "n"))
        if group is None:
            total, outer, n = total.sum(0), outer.sum(0), n.sum()
        else:
            total, outer, n = total[group], outer[group], n[group]
        n = float(n)
        mu = total / max(n, 1.0)
        sigma = (outer - n * torch.outer(mu, mu)) / max(n - 1, 1.0)
        return mu, sigma, n

    def _fvd(self, group: int | None) -> torch.Tensor:
        (mu1, s1, n1), (mu2, s2, n2) = self._stats("real", group), self._stats("fake", group)
        if min(n1, n2) < 2:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return frechet_distance(mu1, s1, mu2, s2)

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            "fvd": self._fvd(None),
            "fvd/per_domain": torch.stack([self._fvd(g) for g in range(len(self.domains))]),
            "fvd/count": self.fake_n.sum(),
        }

    def domain_counts(self) -> torch.Tensor:
        return torch.minimum(self.real_n, self.fake_n)
