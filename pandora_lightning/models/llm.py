"""LLM backbone: reads [video-state tokens, action text, query tokens] and returns the query states."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from pandora_lightning.errors import PandoraError
from pandora_lightning.models.history import RoundCache, history_mask, merge, split_rounds
from pandora_lightning.models.loading import LoadOptions, build_empty, check_weights, load_tokenizer, local_dir, read_config
from pandora_lightning.models.tokenizer import build_word_tokenizer


@dataclass
class LLMConfig:
    pretrained: str | None = None  # local transformers causal-LM dir with its tokenizer; null = tiny Llama
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    num_query_tokens: int = 8  # 64 in the reference
    max_text_tokens: int = 32  # longer prompts are truncated from the left (the newest words survive)
    # Tiny-config init std; None = hidden_size ** -0.5 (0.02 at width 64 leaves a near-identity
    # network whose query states hardly depend on the text).
    initializer_range: float | None = None
    # Rounds of context a round's tokens read: their own and history_rounds - 1 before it (see
    # models/history.py). 1 = no history: every round on its own, as a single-round model; 0 = all.
    history_rounds: int = 1
    # Each round's segment opens with one token made from the previous round's answer (its generator
    # context; WorldModel.answer_adapter), so "again" / "go back" resolve against the round just before,
    # however long the chain of references and whatever the window holds. Needs history (history_rounds
    # != 1); training then reads a window's rounds one after another, as a session does.
    previous_answer: bool = False

    def __post_init__(self):
        if self.initializer_range is None:
            self.initializer_range = self.hidden_size**-0.5
        if self.hidden_size % self.num_heads:
            raise PandoraError(f"llm.hidden_size={self.hidden_size} is not divisible by llm.num_heads={self.num_heads}")
        if self.num_query_tokens < 1 or self.max_text_tokens < 1:
            raise PandoraError("llm.num_query_tokens and llm.max_text_tokens must be >= 1")
        if self.history_rounds < 0:
            raise PandoraError(f"llm.history_rounds={self.history_rounds} must be >= 0 (1 = no history, 0 = every round)")
        if self.previous_answer and self.history_rounds == 1:
            raise PandoraError("llm.previous_answer reads the round before, but llm.history_rounds=1 reads no earlier "
                               "round; set llm.history_rounds to 2 or more (0 = all) or llm.previous_answer=false")


def _from_dir(path: str, load: LoadOptions) -> tuple[nn.Module, object]:
    """A causal LM (weights, or its config only) and its tokenizer from a local folder."""
    folder = local_dir(path, "llm")
    config = read_config(folder)
    model_type, arch = config.get("model_type", "?"), (config.get("architectures") or ["?"])[0]
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise PandoraError(
            f"llm: '{folder}' holds a '{model_type}' model ({arch}); expected a causal language model such as "
            f"LlamaForCausalLM (model_type llama, mistral, qwen2, ...)"
        )
    tokenizer = load_tokenizer(folder, "llm", load)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if check_weights(folder, "llm", load) and not load.lazy:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=load.dtype), tokenizer
    if load.read_weights:  # lazy: the weights are read later, each rank its own shard
        config = AutoConfig.from_pretrained(folder)
        return build_empty(lambda: AutoModelForCausalLM.from_config(config, dtype=load.dtype)), tokenizer
    with load.device():
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=load.dtype), tokenizer


class LLMBackbone(nn.Module):
    """(B, V, D) state embeddings + B texts -> (B, Q, D) last hidden states at the query tokens."""

    def __init__(self, cfg: LLMConfig, vocabulary: Iterable[str] = (), load: LoadOptions = LoadOptions()):
        super().__init__()
        self.cfg = cfg
        self.pretrained: dict[str, str] = {}  # submodule -> the folder its weights were read from
        if cfg.pretrained:
            self.model, self.tokenizer = _from_dir(cfg.pretrained, load)
            if load.read_weights:
                self.pretrained["model"] = cfg.pretrained
        else:
            self.tokenizer = build_word_tokenizer(vocabulary)
            with load.device():
                self.model = LlamaForCausalLM(
                    LlamaConfig(
                        vocab_size=len(self.tokenizer),
                        hidden_size=cfg.hidden_size,
                        intermediate_size=cfg.intermediate_size,
                        num_hidden_layers=cfg.num_layers,
                        num_attention_heads=cfg.num_heads,
                        num_key_value_heads=cfg.num_heads,
                        max_position_embeddings=256,
                        pad_token_id=self.tokenizer.pad_token_id,
                        initializer_range=cfg.initializer_range,
                    )
                )
        if self.tokenizer is not None:
            self.tokenizer.truncation_side = "left"
        self.hidden_size = self.model.config.hidden_size
        # Zero-initialised queries start as pure readers of the prompt: their hidden states are
        # then all attention output (text and state), not their own embedding; RoPE positions
        # keep them apart until training separates them.
        with load.device():
            self.query_tokens = nn.Parameter(torch.zeros(cfg.num_query_tokens, self.hidden_size))

    def tokenize(self, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:  # a config-only folder on the meta device (a plan): the longest prompt
            shape = (len(texts), self.cfg.max_text_tokens)
            return torch.zeros(shape, dtype=torch.long, device=device), torch.ones(shape, dtype=torch.long, device=device)
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.cfg.max_text_tokens, return_tensors="pt"
        )
        return enc.input_ids.to(device), enc.attention_mask.to(device)

    def segment(
        self, state_embeds: torch.Tensor, texts: list[str], answers: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One round: (B, V, D) state + B texts -> [answer, state, text, queries] embeddings (B, L, D) and mask (B, L).

        answers (B, D): the previous round's answer as one token (llm.previous_answer); None: no such token."""
        ids, text_mask = self.tokenize(texts, state_embeds.device)
        embed = self.model.get_input_embeddings()
        if answers is not None:
            state_embeds = torch.cat([answers.to(state_embeds.dtype)[:, None], state_embeds], dim=1)
        b, v, _ = state_embeds.shape
        queries = self.query_tokens.to(state_embeds.dtype).expand(b, -1, -1)
        seq = torch.cat([state_embeds, embed(ids).to(state_embeds.dtype), queries], dim=1)
        ones = text_mask.new_ones
        # Padding sits inside the text span, so the queries always close the segment.
        return seq, torch.cat([ones(b, v), text_mask, ones(b, queries.shape[1])], dim=1)

    def _read(self, seq: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, **kwargs):
        return self.model(
            inputs_embeds=seq, attention_mask=mask, position_ids=positions, output_hidden_states=True, logits_to_keep=1,
            **kwargs,
        )

    def forward(self, state_embeds: torch.Tensor, texts: list[str]) -> torch.Tensor:
        seq, mask = self.segment(state_embeds, texts)
        # Positions skip the padding so the queries always follow the last real word, whatever the text length.
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        return self._read(seq, mask, positions).hidden_states[-1][:, -self.cfg.num_query_tokens :]

    def read_rounds(
        self, states: torch.Tensor, texts: list[list[str]], window: int | None = None, answers: torch.Tensor | None = None
    ) -> torch.Tensor:
        """All rounds at once: states (B, R, V, D), texts[r][b] -> query states (B, R, Q, D).

        Round r's tokens read rounds r - window + 1 .. r (window: llm.history_rounds by default).
        This is how training reads a multi-round window and how a session without a cache reads its
        whole history every round. answers (B, R, D): each round's previous-answer token.
        """
        window = self.cfg.history_rounds if window is None else window
        segments = [self.segment(states[:, r], texts[r], None if answers is None else answers[:, r]) for r in range(states.shape[1])]
        seq = torch.cat([s for s, _ in segments], dim=1)
        mask = torch.cat([m for _, m in segments], dim=1)
        ends = torch.tensor([s.shape[1] for s, _ in segments]).cumsum(0).tolist()
        rounds = torch.cat([torch.full((s.shape[1],), r, device=seq.device) for r, (s, _) in enumerate(segments)])
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        hidden = self._read(seq, history_mask(mask, rounds, window, seq.dtype), positions, use_cache=False).hidden_states[-1]
        q = self.cfg.num_query_tokens
        return torch.stack([hidden[:, end - q : end] for end in ends], dim=1)

    def step(
        self, state_embeds: torch.Tensor, texts: list[str], histories: list[tuple[RoundCache, ...]], positions: list[int],
        answers: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[RoundCache]]:
        """One new round of B sequences, each on its own cached rounds: only the new segment is encoded.

        state_embeds (B, V, D); histories[b]: the rounds sequence b may read (already windowed);
        positions[b]: the position of its first new token (real tokens so far, dropped rounds included);
        answers (B, D): the previous-answer tokens (llm.previous_answer).
        Returns the query states (B, Q, D) and each sequence's new RoundCache.
        """
        seq, mask = self.segment(state_embeds, texts, answers)
        cache, past = merge(histories, self.model.config)
        start = torch.tensor(positions, device=seq.device)[:, None]
        full = torch.cat([past.to(mask), mask], dim=1)
        out = self._read(seq, full, start + (mask.cumsum(1) - 1).clamp(min=0), cache=cache, use_cache=True)
        new = split_rounds(out.cache, full, [(past.shape[1], full.shape[1])])
        return out.hidden_states[-1][:, -self.cfg.num_query_tokens :], [rounds[0] for rounds in new]
