"""Text-video similarity with a local CLIP-style model (CLIPScore averaged over a video's frames).

score(video, text) = mean over frames t of max(100 * cos(E_img(frame_t), E_txt(text)), 0).

The model is a transformers `CLIPModel` directory written by `save_pretrained`, with its tokenizer
beside it; nothing is downloaded. Frames are prepared as the directory's own image processor
(`preprocessor_config.json`) prepares images: shortest side resized to the tower's size (its
resample filter, antialiased), the centre square cut out, its mean/std; OpenAI CLIP's steps when
there is none. A non-square frame is cropped, never squashed. Embeddings come from the towers' pooled outputs and
projections directly, because `get_image_features` changed its return type in transformers 5.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pandora_lightning.errors import PandoraError
from pandora_lightning.evaluation.metrics.base import DomainMetric, check_video, to_unit
from pandora_lightning.models.vision_encoder import ImageProcessing


class ClipEmbedder(nn.Module):
    """Frozen CLIP image and text towers read from a local directory."""

    def __init__(self, path: str | Path):
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise PandoraError(f"CLIP model '{self.path}' is not a directory written by save_pretrained (no config.json)")
        try:
            self.model = CLIPModel.from_pretrained(self.path).eval().requires_grad_(False)
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise PandoraError(f"CLIP model '{self.path}' cannot be loaded as a CLIPModel with its tokenizer: {err}") from None
        self.image_size = self.model.config.vision_config.image_size
        self.processing = ImageProcessing.from_folder(self.path, self.image_size, "clip")
        # Where tokenized texts go (the module's device).
        self.register_buffer("anchor", torch.zeros(()), persistent=False)
        self.max_tokens = self.model.config.text_config.max_position_embeddings

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def images(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (N, 3, H, W) in [0, 1], any H and W -> (N, P) unit-norm embeddings."""
        x = self.processing(frames.clamp(0, 1) * 2 - 1).to(self.model.dtype)
        pooled = self.model.vision_model(pixel_values=x).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """B texts -> (B, P) unit-norm embeddings."""
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.anchor.device)
        pooled = self.model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)


class TextVideoSimilarity(DomainMetric):
    """Mean CLIPScore of (video, text) pairs, overall and per domain (0..100, higher is better)."""

    def __init__(self, embedder: ClipEmbedder, domains: Sequence[str] = (), **kwargs):
        super().__init__(domains, **kwargs)
        self.embedder = embedder
        g = len(self.domains)
        self.add_state("total", torch.zeros(g, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros(g, dtype=torch.float64), dist_reduce_fx="sum")

    def video_scores(self, videos: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """videos (B, T, 3, H, W) uint8 or float in [-1, 1], B texts -> (B,) scores."""
        check_video(videos, "videos")
        if len(texts) != videos.shape[0]:
            raise ValueError(f"got {len(texts)} texts for {videos.shape[0]} videos")
        b, t = videos.shape[:2]
        frames = to_unit(videos.to(self.device)).flatten(0, 1)
        image = self.embedder.images(frames).view(b, t, -1)
        text = self.embedder.texts(texts)
        return (100 * (image * text[:, None]).sum(-1)).clamp(min=0).mean(1)

    def update(self, videos: torch.Tensor, texts: Sequence[str], domains: Sequence[str] | None = None) -> None:
        scores = self.video_scores(videos, texts)
        index = self.domain_index(domains, len(texts))
        self.total.index_add_(0, index, scores.double())
        self.n.index_add_(0, index, torch.ones_like(scores, dtype=torch.float64))

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            "clip_score": self.total.sum() / self.n.sum(),
            "clip_score/per_domain": self.total / self.n,
            "clip_score/count": self.n.sum(),
        }

    def domain_counts(self) -> torch.Tensor:
        return self.n
