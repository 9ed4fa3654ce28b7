"""Generic scoring metrics as torchmetrics Metrics (no Lightning inside): they sum their states across
processes, keep a per-domain breakdown, and `report()` as JSON-ready numbers.

| metric | needs | file |
| --- | --- | --- |
| `VideoPSNR`, `VideoSSIM` (per frame, round, domain) | ground-truth videos | video.py |
| `FrechetVideoDistance` | a TorchScript I3D file (`VideoDetector`) | fvd.py |
| `TextVideoSimilarity` (CLIPScore over frames) | a local CLIP directory (`ClipEmbedder`) | clip_score.py |

A domain's own metrics (the built-in world's action following, in world/metrics.py) come in as
plugins: see `evaluation.suite.EpisodeMetrics`.
"""
from pandora_lightning.evaluation.metrics.base import DomainMetric, to_unit, to_uint8_frames
from pandora_lightning.evaluation.metrics.clip_score import ClipEmbedder, TextVideoSimilarity
from pandora_lightning.evaluation.metrics.fvd import FrechetVideoDistance, VideoDetector, frechet_distance
from pandora_lightning.evaluation.metrics.video import VideoPSNR, VideoSSIM

__all__ = [
    "ClipEmbedder",
    "DomainMetric",
    "FrechetVideoDistance",
    "TextVideoSimilarity",
    "VideoDetector",
    "VideoPSNR",
    "VideoSSIM",
    "frechet_distance",
    "to_uint8_frames",
    "to_unit",
]
