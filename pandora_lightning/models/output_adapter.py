"""Output adapter: LLM query states -> the generator's cross-attention context (Q-Former + projections)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel


@dataclass
class OutputAdapterConfig:
    hidden_size: int = 64  # 768 in the reference
    num_layers: int = 2  # 12 in the reference
    num_heads: int = 4
    intermediate_size: int = 128
    num_queries: int = 8  # 77 in the reference: the length of the text context it replaces
    cross_attention_frequency: int = 1  # 2 in the reference
    # Width of the tokens it hands the generator; null = the generator's cross-attention width.
    # Set it (1024 in the reference) to have a generator of another width refused by name.
    context_dim: int | None = None
    # Weight init std; None = hidden_size ** -0.5. BERT's 0.02 is tuned for width 768 and leaves a
    # narrow Q-Former almost blind to its memory (output variance across inputs ~1e-5 at width 64).
    initializer_range: float | None = None

    def __post_init__(self):
        if self.initializer_range is None:
            self.initializer_range = self.hidden_size**-0.5
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"output_adapter.hidden_size={self.hidden_size} is not divisible by output_adapter.num_heads={self.num_heads}"
            )


class OutputAdapter(nn.Module):
    """(B, Q, Dllm) query states -> (B, N, Dctx): Linear -> Q-Former with N learnable queries -> Linear."""

    def __init__(self, cfg: OutputAdapterConfig, in_dim: int, out_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, cfg.hidden_size)
        self.qformer = Blip2QFormerModel(
            Blip2QFormerConfig(
                hidden_size=cfg.hidden_size,
                num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads,
                intermediate_size=cfg.intermediate_size,
                cross_attention_frequency=cfg.cross_attention_frequency,
                encoder_hidden_size=cfg.hidden_size,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                initializer_range=cfg.initializer_range,
            )
        )
        self.queries = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.hidden_size) * cfg.initializer_range)
        self.proj_out = nn.Linear(cfg.hidden_size, out_dim)
        # Text encoders end in a LayerNorm (CLIP's final_layer_norm), so the generator's
        # cross-attention was trained on unit-scale tokens; the adapter hands it the same.
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, query_states: torch.Tensor) -> torch.Tensor:
        memory = self.proj_in(query_states)
        queries = self.queries.expand(memory.shape[0], -1, -1).to(memory.dtype)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=memory).last_hidden_state
        return self.norm_out(self.proj_out(out))
