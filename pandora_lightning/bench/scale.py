"""The reference-size model on one GPU: step time, tokens/s and MFU in bf16, peak memory against
`plan`'s estimate, activation estimates (meta device) against measured activations, and the time
of one rollout round. Components are built from configs with random weights (no downloads).

    python -m pandora_lightning.bench.scale [--tiny | --reference] [--out scale.json]

`--tiny` runs the same script at test size (CPU), to check it before spending GPU time.
`--reference` builds recipes/pandora-7b/instruct.yaml itself from the published configs
(`bench/reference.py`: Vicuna-7B, CLIP ViT-L/14, SVD-xt's UNet and VAE, an OpenCLIP-H text
encoder) with random weights, at its 16 frames of 320x512; without it the reference sizes are
set on the tiny recipe's own components (below).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pandora_lightning.inference.rollout import rollout
from pandora_lightning.recipe import load_recipe
from pandora_lightning.training import plan
from pandora_lightning.training.parallel import apply_activation_checkpointing
from pandora_lightning.training.stage import STAGES

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "instruct.yaml"
REFERENCE_RECIPE = RECIPE.parents[1] / "pandora-7b" / "instruct.yaml"
# Reference sizes (DESIGN.md): Llama-7B-class LLM, CLIP ViT-L/14, Q-Former 768/12/77, an SVD-size
# UNet (4 levels 320-1280, 2 layers each, cross-attention 1024), an OpenCLIP-H-size text encoder.
# The UNet runs on 8x8 pixel patches (192 channels) instead of 4 VAE latent channels: the same
# 1/8-size grid, so the same blocks and nearly the same FLOPs.
REFERENCE = [
    "model.vision.kind=clip", "model.vision.image_size=224", "model.vision.patch_size=14", "model.vision.hidden_size=1024",
    "model.vision.num_layers=24", "model.vision.num_heads=16", "model.input_adapter.tokens_per_frame=100",
    "model.llm.hidden_size=4096", "model.llm.num_layers=32", "model.llm.num_heads=32", "model.llm.intermediate_size=11008",
    "model.llm.num_query_tokens=64", "model.llm.max_text_tokens=32",
    "model.output_adapter.hidden_size=768", "model.output_adapter.num_layers=12", "model.output_adapter.num_heads=12",
    "model.output_adapter.intermediate_size=3072", "model.output_adapter.num_queries=77",
    "model.output_adapter.cross_attention_frequency=2",
    "model.generator.patch_size=8", "model.generator.block_out_channels=[320,640,1280,1280]",
    "model.generator.layers_per_block=2", "model.generator.attention_head_dim=64", "model.generator.cross_attention_dim=1024",
    "model.text_encoder.num_layers=24", "model.text_encoder.num_heads=16", "model.text_encoder.intermediate_size=4096",
    "trainer.precision=bf16-mixed", "loss.text_dropout=0", "init_from=null", "vocabulary=null",
]
TINY = ["trainer.precision=bf16-mixed", "loss.text_dropout=0", "init_from=null", "model.generator.frames=6"]
VOCAB = "move slide step left right up down grow shrink bigger smaller the object to".split()
PEAK_TFLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense bf16


def nonsquare() -> bool:
    from pandora_lightning.models.generator import GeneratorConfig

    return "height" in GeneratorConfig.__dataclass_fields__


def clip(frames: int, height: int, cond: int, width: int | None = None) -> list[str]:
    """Recipe overrides for clips of `frames` frames at height x width (square where the generator
    config has one size)."""
    size = [f"model.generator.height={height}", f"model.generator.width={width or height}"] if nonsquare() \
        else [f"model.generator.image_size={height}"]
    return [f"model.generator.frames={frames}", f"model.generator.cond_frames={cond}", *size]


def frame_size(recipe) -> tuple[int, int]:
    g = recipe.model.generator
    return (g.height, g.width) if nonsquare() else (g.image_size, g.image_size)


def build(recipe, device: str):
    with torch.device(device):
        stage = STAGES[recipe.stage].from_recipe(recipe, VOCAB)
    stage.to(device)
    # A scheduler is no module: built under the device context its tables landed on the GPU, where
    # diffusers' numpy steps (Karras sigmas) cannot read them; from_pretrained keeps them on the CPU.
    scheduler = getattr(stage.model.generator, "scheduler", None)
    for name, value in list(vars(scheduler).items()) if scheduler is not None else []:
        if isinstance(value, torch.Tensor):
            setattr(scheduler, name, value.cpu())
    for p in stage.parameters():  # frozen weights in the compute dtype, trainable ones fp32 (as a bf16 run keeps them)
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    return stage


def batch_for(recipe, device: str, batch: int = 1) -> dict:
    height, width = frame_size(recipe)
    frames = torch.randint(0, 255, (batch, recipe.model.generator.frames, 3, height, width), dtype=torch.uint8, device=device)
    return {"frames": frames, "text": ["move the object to the left"] * batch}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measured_activations(stage, recipe, device: str) -> int:
    """Bytes allocated above the model during forward + backward, gradients dropped as they arrive
    (the definition `plan.measure_step` uses on meta). On CPU: the same tracker on real tensors."""
    batch = batch_for(recipe, device)
    step = lambda: stage.losses(batch)["loss"]  # noqa: E731
    autocast = torch.autocast(device, dtype=torch.bfloat16)
    if device != "cuda":
        with autocast:
            return plan.measure_step(stage, step, device)
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
             for p in stage.parameters() if p.requires_grad]
    sync(device)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with autocast:
        loss = step()
    loss.backward()
    sync(device)
    for h in hooks:
        h.remove()
    return torch.cuda.max_memory_allocated() - base


def estimated_activations(recipe, checkpointing: bool) -> int:
    stage = plan.build_on_meta(recipe)
    for p in stage.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    return plan.measure_activations(stage, recipe, 1, plan.checkpointable(stage.model) if checkpointing else [])


def model_flops(recipe) -> int:
    """FLOPs of one training step (forward + backward, no recomputation), counted on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    stage = plan.build_on_meta(recipe)
    stage.train()
    batch = plan.plan_batch(recipe, 1)
    dtype = torch.bfloat16 if recipe.trainer.precision.startswith("bf16") else torch.float32
    with torch.device("meta"), plan.MetaScalars(), plan.MetaAutocast(dtype), FlopCounterMode(display=False) as counter:
        stage.losses(batch)["loss"].backward()
    return counter.get_total_flops()


class Sections:
    """Runs each measurement on its own: one that fails is recorded, the others still run; every
    result is printed as soon as it exists (a GPU lease may end before the last one)."""

    def __init__(self, out: dict, path: Path | None):
        self.out, self.path = out, path

    def __call__(self, name: str, fn):
        t0 = time.perf_counter()
        try:
            self.out[name] = fn()
        except Exception as err:  # noqa: BLE001 - record and go on
            self.out[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        if isinstance(self.out[name], dict):
            self.out[name]["section_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({name: self.out[name]}, default=str), flush=True)
        if self.path:
            self.path.write_text(json.dumps(self.out, indent=1, default=str) + "\n")
        return self.out[name]


def reference_overrides(root: Path) -> list[str]:
    """The pandora-7b recipe on config-only folders of the published configs, random weights."""
    from pandora_lightning.bench.reference import write_reference_folders

    folders = write_reference_folders(root, tokenizer_words=VOCAB)
    return [*(f"model.{slot}.pretrained={path}" for slot, path in folders.items()), "model.weights=random",
            "init_from=null", "data.manifest=none.yaml", "loss.text_dropout=0"]


def run(tiny: bool, steps: int, path: Path | None = None, reference: bool = False) -> dict:
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    base = TINY if tiny else REFERENCE
    # the reference 320 x 512 where the generator takes non-square frames, else a square of about its area
    ref_clip = clip(6, 32, 2) if tiny else clip(16, 320, 4, 512) if nonsquare() else clip(16, 384, 4)
    mid_clip = clip(4, 32, 2) if tiny else clip(16 if reference else 8, 256, 4)  # svd's UNet is built for its frames
    recipe_path = RECIPE
    if reference:
        import tempfile

        recipe_path, base = REFERENCE_RECIPE, reference_overrides(Path(tempfile.mkdtemp(prefix="pandora-7b-")))
    out: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                 "recipe": f"{recipe_path.relative_to(RECIPE.parents[2])}" + (" (published configs, random weights)" if reference else "")}
    section = Sections(out, path)
    recipe = load_recipe(recipe_path, [*base, *ref_clip])
    mid = load_recipe(recipe_path, [*base, *mid_clip])
    state: dict = {}

    def build_model():
        t0 = time.perf_counter()
        state["stage"] = stage = build(recipe, device)
        sync(device)
        counts = state["counts"] = plan.count(stage.model)
        stage.train()
        state["ckpt"] = plan.checkpointable(stage.model)
        return {"build_s": round(time.perf_counter() - t0, 1), "trainable": counts.trainable, "frozen": counts.frozen,
                "total": counts.total_trainable + counts.total_frozen, "trainable_total": counts.total_trainable}

    def activations(rec, checkpointing: bool):
        def fn():
            stage = state["stage"]
            if checkpointing and not state.get("ckpt_on"):
                apply_activation_checkpointing(stage.model, state["ckpt"])
                stage.train()
                state["ckpt_on"] = True
            measured = measured_activations(stage, rec, device)
            estimated = estimated_activations(rec, checkpointing)
            height, width = frame_size(rec)
            return {"clip": f"{rec.model.generator.frames} frames at {height}x{width}", "checkpointing": checkpointing,
                    "measured_GiB": measured / 2**30, "estimated_GiB": estimated / 2**30,
                    "estimate/measured": estimated / measured}
        return fn

    def train():
        stage, counts = state["stage"], state["counts"]
        trainable = [p for p in stage.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device == "cuda")
        batch = state["batch"] = batch_for(recipe, device)

        def train_step():
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = stage.losses(batch)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # as trainer.gradient_clip_val=1.0 does
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        first_loss = float(train_step().detach())  # optimizer state exists from here on
        sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = train_step()
        sync(device)
        step_s = (time.perf_counter() - t0) / steps
        result = {"checkpointing": state["ckpt"], "batch": 1, "first_loss": first_loss, "last_loss": float(loss.detach()),
                  "step_s": step_s}
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated()
            act = out.get("activations_ref_clip_ckpt", {}).get("estimated_GiB")
            result["peak_memory_GiB"] = peak / 2**30
            result["max_reserved_GiB"] = torch.cuda.max_memory_reserved() / 2**30
            if act:
                est = plan.peak_bytes(plan.Setting("ddp", True, False), counts, int(act * 2**30), 1, 2, 2, multi=False)
                result["plan_peak_GiB_without_reserve"] = (est["total"] - plan.RESERVE) / 2**30
                result["plan/measured"] = (est["total"] - plan.RESERVE) / peak
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        state["step_s"] = step_s
        return result

    def throughput():
        step_s = state["step_s"]
        g = recipe.model.generator
        llm_tokens = g.cond_frames * recipe.model.input_adapter.tokens_per_frame + recipe.model.llm.max_text_tokens \
            + recipe.model.llm.num_query_tokens
        height, width = frame_size(recipe)
        factor = 8 if reference else g.patch_size  # the VAE downscale, or the tiny UNet's pixel patches
        unet_tokens = g.frames * (height // factor) * (width // factor)
        flops = model_flops(recipe)
        peak_flops = next((v for k, v in PEAK_TFLOPS.items() if k in out["device"]), None)
        return {"samples_per_s": 1 / step_s, "frames_per_s": g.frames / step_s, "llm_tokens_per_s": llm_tokens / step_s,
                "unet_positions_per_s": unet_tokens / step_s, "model_tflop_per_step": flops / 1e12,
                "achieved_tflops": flops / step_s / 1e12, "mfu": flops / step_s / peak_flops if peak_flops else None,
                "note": "model FLOPs (forward + backward, no recomputation) / step time / dense bf16 peak"}

    def rollout_round():
        stage = state["stage"]
        stage.eval()
        stage.model.generator.cfg.num_inference_steps = 2
        start = state["batch"]["frames"][:, 0].to(torch.float32) / 127.5 - 1
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            rollout(stage.model, start, [["move left"]], seed=0)  # warm-up
            stage.model.generator.cfg.num_inference_steps = 25
            sync(device)
            t0 = time.perf_counter()
            video = rollout(stage.model, start, [["move left"]], seed=0)
            sync(device)
        return {"seconds": time.perf_counter() - t0, "sampler_steps": 25, "video": list(video.shape),
                "peak_memory_GiB": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}

    section("model", build_model)
    section("activations_mid_clip_no_ckpt", activations(mid, False))
    section("activations_ref_clip_ckpt", activations(recipe, True))
    section("train_step_ref_clip", train)
    section("throughput", throughput)
    section("rollout_round", rollout_round)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--reference", action="store_true", help="recipes/pandora-7b/instruct.yaml from the published configs")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="scale.json")
    args = parser.parse_args()
    run(args.tiny, args.steps, Path(args.out), args.reference)


if __name__ == "__main__":
    main()
