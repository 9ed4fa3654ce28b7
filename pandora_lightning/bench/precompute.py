"""`make bench`, precomputed inputs: a training step from precomputed inputs against the same step from frames.

The model: the tiny instruct recipe around a tiny random generator of the i2vgen-xl family (a real
diffusers folder in that release's layout, written here: UNet, a VAE, a CLIP image encoder and the
CLIP text teacher), so that the VAE, the image encoder, the vision tower and the teacher all run in
the baseline. World shards (`clips` train clips) are encoded once with `shards encode` (timed);
then both stages train on the same batches (held in memory, so only the step is timed) from the
same initial weights with the same optimiser, in a plain loop (bench/train.py), taking turns step by
step; the median step after WARMUP is reported. Loading is timed apart: the shard loader (0 workers) making those batches.
"""
from __future__ import annotations

import platform
import tempfile
import time
from itertools import islice
from pathlib import Path

import lightning as L
import torch

from pandora_lightning.data.manifest import write_manifest
from pandora_lightning.recipe import load_recipe
from pandora_lightning.training.fit import train_loader
from pandora_lightning.training.precompute import run_encode
from pandora_lightning.training.stage import STAGES
from pandora_lightning.training.vocabulary import resolve_vocabulary, training_texts
from pandora_lightning.world import WorldConfig
from pandora_lightning.world.shards import write_world_shards

WARMUP = 2
TOKENS = 16  # the teacher's tokenizer length = the output adapter's queries


def tiny_i2vgen_folder(folder: Path, words: list[str]) -> Path:
    """A random i2vgen-xl pipeline at tiny widths (diffusers' own pipeline-test sizes), saved as a release is."""
    from diffusers import AutoencoderKL, DDIMScheduler, I2VGenXLPipeline, I2VGenXLUNet
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from pandora_lightning.models.tokenizer import word_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = word_clip_tokenizer(words, TOKENS)
    unet = I2VGenXLUNet(block_out_channels=(32, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
                        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=2, num_hidden_layers=2,
                                        vocab_size=len(tokenizer), max_position_embeddings=TOKENS, projection_dim=32,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    image = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, projection_dim=32, num_hidden_layers=2,
                                                           num_attention_heads=2, image_size=32, intermediate_size=37, patch_size=8))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              prediction_type="v_prediction", rescale_betas_zero_snr=True, steps_offset=1)
    I2VGenXLPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, image_encoder=image, unet=unet, scheduler=scheduler,
                     feature_extractor=CLIPImageProcessor(crop_size=32, size=32)).save_pretrained(folder)
    return folder


class _Trainer:
    """One stage, its AdamW and its batches: a plain training step at a time (bench/train.py's loop)."""

    def __init__(self, recipe, batches: list[dict]):
        L.seed_everything(recipe.seed, verbose=False)
        self.stage = STAGES[recipe.stage].from_recipe(recipe, resolve_vocabulary(recipe, training_texts(recipe))).train()
        self.optimizer = self.stage.configure_optimizers()["optimizer"]
        self.params = [p for p in self.stage.parameters() if p.requires_grad]
        self.clip, self.batches, self.times = recipe.trainer.gradient_clip_val, batches, []

    def step(self, i: int) -> None:
        started = time.perf_counter()
        self.stage.losses(self.batches[i])["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - started)

    def median(self) -> float:
        steps = sorted(self.times[WARMUP:])
        return steps[len(steps) // 2]


def _batches(recipe, n: int) -> tuple[list[dict], float]:
    started = time.perf_counter()
    batches = list(islice(iter(train_loader(recipe, "action")), n))
    return batches, (time.perf_counter() - started) / n


def run_precompute_bench(recipe_path: str = "recipes/tiny/instruct.yaml", clips: int = 64, steps: int = 16,
                         batch_size: int = 2) -> dict:
    """The i2vgen-xl UNet pools its image stream to a fixed 32x32 grid whatever the clip size, so even at
    tiny widths its step costs seconds on a CPU: small clips (3 frames at 16x16) and batches of 2."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        records = write_world_shards(root / "shards", WorldConfig(), {"train": clips // 4}, samples_per_shard=clips // 8)
        manifest = write_manifest(root / "world.yaml", "bench", root / "shards", records).path
        common = ["init_from=null", "vocabulary=null", f"data.manifest={manifest}", "data.num_workers=0",
                  f"data.batch_size={batch_size}", "model.output_adapter.num_queries=16", "model.generator.frames=3",
                  "model.generator.cond_frames=1", "model.generator.height=16", "model.generator.width=16"]
        raw = load_recipe(recipe_path, common)
        words = sorted({w for t in training_texts(raw) for w in t.split()})
        folder = tiny_i2vgen_folder(root / "i2vgen-xl", words)
        raw = load_recipe(recipe_path, [*common, f"model.generator.pretrained={folder}"])
        started = time.perf_counter()
        encoded = run_encode(manifest, raw, recipe_path, str(root / "encoded"), progress=False, device="cpu")
        encode_s = time.perf_counter() - started
        pre = load_recipe(recipe_path, [*common, f"model.generator.pretrained={folder}",
                                        f"data.manifest={encoded['manifest']}", "data.precomputed=true"])
        n = steps + WARMUP + 1
        raw_batches, raw_load = _batches(raw, n)
        pre_batches, pre_load = _batches(pre, n)
        assert [b["key"] for b in raw_batches] == [b["key"] for b in pre_batches], "the two loaders give the same samples"
        # the two take turns step by step, so that the machine's drift falls on both alike
        runs = [_Trainer(raw, raw_batches), _Trainer(pre, pre_batches)]
        for i in range(n):
            for run in runs if i % 2 else runs[::-1]:
                run.step(i)
    raw_s, pre_s = (run.median() for run in runs)
    raw_params, pre_params = (sum(p.numel() for p in run.stage.parameters()) for run in runs)
    g = raw.model.generator
    result = {
        "model": f"tiny instruct recipe, i2vgen-xl family (VAE + CLIP image encoder + CLIP text teacher), batch {batch_size}, "
                 f"{g.frames} frames at {g.height}x{g.width}",
        "frames_step_s": round(raw_s, 4), "precomputed_step_s": round(pre_s, 4), "step_speedup": round(raw_s / pre_s, 2),
        "frames_load_batch_s": round(raw_load, 4), "precomputed_load_batch_s": round(pre_load, 4),
        "frames_params": raw_params, "precomputed_params": pre_params,
        "encode_clips_per_s": round(encoded["samples"] / encode_s, 1), "encoded_clips": encoded["samples"],
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    print(f"\n=== bench: training from precomputed inputs vs from frames ({result['model']}) ===")
    print(f"{'':<34} {'from frames (baseline)':>22} {'precomputed':>12} {'ratio':>7}")
    rows = [("train step, s (median)", raw_s, pre_s), ("loading a batch, s (0 workers)", raw_load, pre_load),
            ("parameters on the device", raw_params, pre_params)]
    for name, a, b in rows:
        fmt = (lambda v: f"{v:,}") if isinstance(a, int) else (lambda v: f"{v:.4f}")
        print(f"{name:<34} {fmt(a):>22} {fmt(b):>12} {b / a:>7.2f}")
    print(f"shards encode: {result['encoded_clips']} clips at {result['encode_clips_per_s']} clips/s ({result['machine']})")
    return result
