"""Scoring metrics as torchmetrics Metrics (no Lightning inside): they sum their states across
processes, keep a per-domain breakdown, and `report()` as JSON-ready numbers.

| metric | needs | file |
| --- | --- | --- |
| `VideoPSNR`, `VideoSSIM` (per frame, round, domain) | ground-truth videos | video.py |
| `FrechetVideoDistance` | a TorchScript I3D file (`VideoDetector`) | fvd.py |
| `TextVideoSimilarity` (CLIPScore over frames) | a local CLIP directory (`ClipEmbedder`) | clip_score.py |
| `ActionFollowing`, `TemporalConsistency` | episodes of the built-in world | world.py |
"""
from pandora_lightning.metrics.base import DomainMetric, to_unit, to_uint8_frames
from pandora_lightning.metrics.clip_score import ClipEmbedder, TextVideoSimilarity
from pandora_lightning.metrics.fvd import FrechetVideoDistance, VideoDetector, frechet_distance
from pandora_lightning.metrics.video import VideoPSNR, VideoSSIM
from pandora_lightning.metrics.world import ActionFollowing, TemporalConsistency

__all__ = [
    "ActionFollowing",
    "ClipEmbedder",
    "DomainMetric",
    "FrechetVideoDistance",
    "TemporalConsistency",
    "TextVideoSimilarity",
    "VideoDetector",
    "VideoPSNR",
    "VideoSSIM",
    "frechet_distance",
    "to_uint8_frames",
    "to_unit",
]
