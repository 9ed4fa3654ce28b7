"""Precomputed inputs in shards: what `shards encode` adds to each sample and how training reads it.

An encoded sample keeps its `mp4` and `json` members and gains `encoded.safetensors`, one
safetensors blob (its header metadata lists the texts) holding, for the whole clip:

    vision          (F, gh, gw, Dv)  the frozen vision tower's features of the F frames a window can
                                     give the input adapter (`vision_frames` (F,) says which frames)
    teacher         (K, N, D)        the teacher text encoder's embedding of each text of the sample
                                     (its caption, its action texts and the empty text, in `texts` order)
    gen.<name>      (T, ...)         the generator's frozen parts per frame (e.g. gen.latents: scaled VAE
                                     latents, gen.image_embeds: CLIP image embeddings)

Training cuts the same window `ExampleDecoder` would (same random choice of action, same start) out
of these tensors instead of decoding and encoding the frames.
"""
from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from pandora_lightning.data.dataset import BadSampleCounter, ExampleDecoder

MEMBER = "encoded.safetensors"


def window_starts(meta: dict, cond_frames: int) -> list[int]:
    """Every frame a training window can start at, for either text kind (see ExampleDecoder.window)."""
    starts = {0} if meta.get("caption", "").strip() else set()
    starts |= {max(0, a["start"] - cond_frames) for a in meta.get("actions", []) if a["end"] > cond_frames}
    return sorted(starts)


def given_frames(meta: dict, cond_frames: int, num_frames: int) -> list[int]:
    """The frames the input adapter can be given (the first `cond_frames` of every possible window)."""
    return sorted({f for s in window_starts(meta, cond_frames) for f in range(s, s + cond_frames) if f < num_frames})


def sample_texts(meta: dict) -> list[str]:
    """The texts whose teacher embedding a sample stores: its caption, its actions, the empty text (text dropout)."""
    texts = [meta["caption"]] if meta.get("caption", "").strip() else []
    texts += [a.get("resolved_text", a["text"]) for a in meta.get("actions", [])]  # what the teacher reads
    return list(dict.fromkeys([*texts, ""]))


def pack(tensors: dict[str, torch.Tensor], texts: list[str]) -> bytes:
    return save_tensors({k: v.contiguous() for k, v in tensors.items()}, metadata={"texts": json.dumps(texts)})


def unpack(data: bytes) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An `encoded.safetensors` member -> (tensors, texts)."""
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"the {MEMBER} member is missing (not an encoded shard)")
    (size,) = struct.unpack("<Q", bytes(data[:8]))
    header = json.loads(bytes(data[8 : 8 + size]))
    return load_tensors(bytes(data)), json.loads(header.get("__metadata__", {}).get("texts", "[]"))


class EncodedExampleDecoder(ExampleDecoder):
    """Encoded shard sample -> {"encoded": {"vision", "teacher", "teacher_empty", "gen.*"}, "text", "teacher_text",
    "domain", "key"} (+ "frames" when the generator reads pixels), or None (counted), for the one-round window
    ExampleDecoder would cut ("teacher" is the stored embedding of its teacher_text)."""

    def __init__(self, kind: str, frames: int, cond_frames: int, counter: BadSampleCounter | None = None,
                 size: tuple[int, int] | None = None, needs_frames: bool = True):
        super().__init__(kind, frames, cond_frames, counter, size)
        self.needs_frames = needs_frames

    def payload(self, sample: dict, start: int, teacher) -> dict:
        tensors, texts = unpack(sample.get(MEMBER))
        out = self._cut(tensors, texts, start, teacher)
        if self.needs_frames:
            out["frames"] = self.frames_at(sample, start, self.frames)
        return out

    def _cut(self, tensors: dict, texts: list[str], start: int, text: str) -> dict:
        encoded = {}
        end = start + self.frames
        for name, value in tensors.items():
            if name.startswith("gen."):
                if len(value) < end:
                    raise ValueError(f"{name} has {len(value)} frames, the window needs {end}")
                encoded[name] = value[start:end]
        stored = tensors["vision_frames"].tolist()
        given = list(range(start, start + self.cond_frames))
        if any(f not in stored for f in given):
            raise ValueError(f"frames {given} have no stored vision features (encoded for other cond_frames?)")
        encoded["vision"] = tensors["vision"][[stored.index(f) for f in given]]
        if "teacher" in tensors:
            encoded["teacher"] = tensors["teacher"][texts.index(text)]
            encoded["teacher_empty"] = tensors["teacher"][texts.index("")]
        return {"encoded": encoded}
