"""What the training data path needs from a recipe: the `data` block."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    manifest: str | None = None  # a data_manifests/*.yaml file (required for training)
    split: str = "train"
    batch_size: int = 8
    num_workers: int = 1
    shuffle_buffer: int = 128
    max_bad_fraction: float = 0.05  # stop the run when more than this share of samples is corrupt
    epoch_samples: int = 0  # samples an epoch over the whole job; 0 = the split's sample count in the manifest
    # Which text of a sample steers the generator: caption | action; null = the stage's own
    # (align: caption, instruct: action).
    text_kind: str | None = None

    def __post_init__(self):
        if self.batch_size < 1 or self.num_workers < 0 or self.epoch_samples < 0:
            raise ValueError("data.batch_size must be >= 1, data.num_workers and data.epoch_samples >= 0")
        if self.text_kind not in (None, "caption", "action"):
            raise ValueError(f"data.text_kind='{self.text_kind}' is unknown; use caption, action or null")
