"""What the training data path needs from a recipe: the `data` block."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    manifest: str | None = None  # a data_manifests/*.yaml file (required for training)
    split: str = "train"
    # Train on these domains of the split only (their manifest weights renormalised); empty: every
    # domain. E.g. `demo --practice`'s polish stage leaves the practice domains out.
    domains: list[str] = field(default_factory=list)
    batch_size: int = 8
    num_workers: int = 1
    shuffle_buffer: int = 128
    # The run stops (after writing checkpoints/last.ckpt) once more than this share of the samples read
    # so far (counted up to one epoch's worth) is corrupt, each corrupt sample counted once by shard and
    # key, and at least `min_bad_samples` are: so one bad sample among the first few read does not stop
    # a run. On a small set lower min_bad_samples (1 makes the fraction alone decide).
    max_bad_fraction: float = 0.05
    min_bad_samples: int = 4
    # Manifest entries that run a command to be read (`pipe:cmd` runs a shell command, http(s)://, s3://
    # ... run curl or a cloud tool) are refused unless this is true: opt in only for manifests you trust.
    allow_commands: bool = False
    epoch_samples: int = 0  # samples an epoch over the whole job; 0 = the split's sample count in the manifest
    # Which text of a sample steers the generator: caption | action; null = the stage's own
    # (align: caption, instruct: action).
    text_kind: str | None = None
    # Consecutive rounds per training example (multi-round windows, so an LLM with history learns
    # to read earlier rounds; needs action texts); 1 = one round per example.
    rounds: int = 1
    # Multi-round windows may open on an action that refers to one before the window ("again" as the
    # first round): its own words cannot say what it means, the given frames (the last round's motion)
    # can. False: every window opens on an action said plainly, so every reference resolves in its text.
    # Only for rounds > 1: a one-round example is any action, references included.
    open_on_reference: bool = False
    # Train from the frozen encoders' outputs stored by `pandora-lightning shards encode` (the manifest
    # it writes): the vision tower, the VAE (and image encoder) and the teacher text encoder are then
    # not built on the device. Refused when the manifest was encoded by other encoders, at another
    # frame size or clip length, or when the recipe trains one of those encoders.
    precomputed: bool = False
    # Share of training clips shown in other colours (RGB channels permuted, each inverted with
    # probability 1/2; see data/dataset.py, recolor), so an action is learnt apart from the colours it
    # was seen in. Action texts only (a caption names the colours); not with precomputed inputs.
    recolor: float = 0.0
    # RGB colours a recoloured clip must not take on: a recolouring whose result has its mean colour
    # within `recolor_avoid_radius` of one of them is drawn again (e.g. the look of a domain held out to
    # test transfer; `demo --practice` passes the desert's sand).
    recolor_avoid: list[list[int]] = field(default_factory=list)
    recolor_avoid_radius: float = 100.0

    def __post_init__(self):
        if self.precomputed and self.rounds > 1:
            raise ValueError(f"data.precomputed reads one-round windows; set data.rounds=1 (got {self.rounds}) or "
                             f"data.precomputed=false")
        if self.batch_size < 1 or self.num_workers < 0 or self.epoch_samples < 0:
            raise ValueError("data.batch_size must be >= 1, data.num_workers and data.epoch_samples >= 0")
        if not 0.0 <= self.max_bad_fraction <= 1.0 or self.min_bad_samples < 1:
            raise ValueError("data.max_bad_fraction must be in [0, 1] and data.min_bad_samples >= 1")
        if self.text_kind not in (None, "caption", "action"):
            raise ValueError(f"data.text_kind='{self.text_kind}' is unknown; use caption, action or null")
        if self.rounds < 1:
            raise ValueError(f"data.rounds={self.rounds} must be >= 1")
        if not 0.0 <= self.recolor <= 1.0:
            raise ValueError(f"data.recolor={self.recolor} must be a share of training clips in [0, 1]")
        if any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in self.recolor_avoid):
            raise ValueError(f"data.recolor_avoid={self.recolor_avoid} must list RGB colours, e.g. [[218, 182, 125]]")
        if self.recolor and self.precomputed:
            raise ValueError("data.recolor changes the pixels that data.precomputed stored encoded; set one of them off")
