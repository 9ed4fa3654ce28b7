"""What every scoring metric shares: per-domain states, the video value ranges, and a JSON report.

Metrics keep their sums per domain, so one instance gives the overall value and the per-domain
breakdown, and every state is a fixed-shape tensor summed across processes (DDP-safe).
`compute()` returns a flat dict of tensors: a headline scalar `"<name>"`, and where the metric has
them `"<name>/per_domain"` (G,), `"<name>/per_round"` (R,), `"<name>/per_frame"` (T,) and a
`"<name>/count"` scalar (videos, frames or rounds counted).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric

from pandora_lightning.data.frames import to_uint8

ANY_DOMAIN = "all"


def to_unit(video: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] or float in [-1, 1] (the model's range) -> float32 in [0, 1], same shape."""
    if video.dtype == torch.uint8:
        return video.float() / 255.0
    return ((video.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) uint8 or float in [-1, 1] -> (..., H, W, 3) uint8 on the CPU (for measuring)."""
    return (video if video.dtype == torch.uint8 else to_uint8(video)).movedim(-3, -1).cpu()


def check_video(video: torch.Tensor, what: str) -> None:
    if video.ndim != 5 or video.shape[2] != 3:
        raise ValueError(f"{what} must be (B, T, 3, H, W) videos, got shape {tuple(video.shape)}")


class DomainMetric(Metric):
    """A torchmetrics Metric whose states carry a leading domain axis of size G = len(domains)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, domains: Sequence[str] = (), **kwargs):
        super().__init__(**kwargs)
        self.domains = tuple(domains) or (ANY_DOMAIN,)
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains must be unique, got {self.domains}")

    def domain_index(self, domains: Sequence[str] | None, batch: int) -> torch.Tensor:
        """(B,) long indices into `self.domains`; None means every sample is in the only domain."""
        if domains is None:
            if len(self.domains) > 1:
                raise ValueError(f"this metric keeps domains {self.domains}: pass domains= with each update")
            return torch.zeros(batch, dtype=torch.long, device=self.device)
        if len(domains) != batch:
            raise ValueError(f"got {len(domains)} domain names for a batch of {batch}")
        unknown = sorted({d for d in domains if d not in self.domains})
        if unknown:
            raise ValueError(f"domain(s) {unknown} are not among this metric's domains {self.domains}")
        return torch.tensor([self.domains.index(d) for d in domains], dtype=torch.long, device=self.device)

    def domain_counts(self) -> torch.Tensor:
        """(G,) how much each domain has seen; domains with 0 are left out of `report()`."""
        raise NotImplementedError

    def report(self) -> dict[str, dict]:
        """`compute()` as JSON-ready floats: {name: {"overall", "per_domain": {domain: v}, "per_round": [...], ...}}.

        Domains that saw nothing are left out; NaN (e.g. FVD of a domain with one video) and
        infinity (PSNR of identical frames) become None, so the result is strict JSON.
        """
        values = self.compute()
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            seen = self.domain_counts().detach().cpu()
        out: dict[str, dict] = {}
        for key, value in values.items():
            name, _, part = key.partition("/")
            entry = out.setdefault(name, {})
            value = value.detach().cpu().double()
            if part.startswith("per_"):  # torchmetrics squeezes one-element results to 0-d
                value = value.reshape(-1)
            if not part:
                entry["overall"] = _number(value)
            elif part == "per_domain":
                entry[part] = {d: _number(v) for d, v, n in zip(self.domains, value, seen) if n > 0}
            elif part == "count":
                entry[part] = int(value)
            elif value.ndim == 0:
                entry[part] = _number(value)
            else:
                entry[part] = [_number(v) for v in value]
        return out


def _number(value: torch.Tensor) -> float | None:
    v = float(value)
    return v if math.isfinite(v) else None
