"""`pandora-lightning plan RECIPE --gpus N`: parameters per component and the peak memory per GPU of
each way to run the recipe, with the activations measured, not guessed.

The stage is built on the meta device (shapes, no memory, no weights needed) and one training step
(forward + backward) runs there on a batch of the recipe's size. A dispatch mode records every
tensor the step creates and when it is freed, so the peak of live non-parameter bytes is the
activation peak of the real step: stored activations, recomputation under activation
checkpointing, temporaries. Gradients are dropped as they arrive and counted separately, as the
strategies store them differently. Weights, gradients and optimizer state follow from the counts:

  ddp    per GPU: trainable fp32 master (4) + Adam moments (8) + DDP bucket (4) bytes, frozen
         weights in their dtype; gradients (4) only from backward to the optimizer step, so the
         transient is the larger of activations and gradients
  fsdp2  per GPU: the same sharded over N GPUs (no buckets), plus the gathered blocks in flight:
         the largest component root, two blocks (one prefetched) and one block's gradients
  offload (fsdp2): the sharded part moves to host memory
  precomputed: the stage as `data.precomputed: true` builds it: the frozen encoders (vision tower,
         teacher text encoder, the generator's VAE / image encoder) are not on the GPU, and the
         step reads their outputs from the batch (rows left out where the recipe cannot use it)
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from pandora_lightning.errors import PandoraError
from pandora_lightning.training.parallel import COMPONENTS, blocks_of, component_units

GiB = 2**30
RESERVE = 1.5 * GiB  # CUDA context, NCCL buffers, allocator fragmentation: not measured, added as is
HEADROOM = 0.10


class MetaScalars(TorchDispatchMode):
    """On meta tensors a value-dependent read (`.item()`, `bool(t)`, as transformers' mask checks do)
    answers 1: the planning batch has no padding, so "all ones" is the true answer there."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return 1.0 if args[0].dtype.is_floating_point else 1
        return func(*args, **(kwargs or {}))


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors created inside the mode (parameters and buffers excluded), by storage.

    On meta tensors a value-dependent read (`.item()`, `bool(t)`, as transformers' mask checks do)
    answers 1: the planning batch has no padding, so "all ones" is the true answer there.
    """

    def __init__(self, exclude: WeakIdKeyDictionary):
        super().__init__()
        self.exclude, self.seen = exclude, WeakIdKeyDictionary()
        self.current = self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return 1.0 if args[0].dtype.is_floating_point else 1
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage in self.seen or storage in self.exclude:
                continue
            nbytes = storage.nbytes()
            self.seen[storage] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, nbytes)
        return out


def measure_step(module: nn.Module, step, device: str | torch.device = "meta") -> int:
    """Peak activation bytes of `step()` (a forward returning a loss) plus its backward on `module`."""
    exclude = WeakIdKeyDictionary()
    for t in [*module.parameters(), *module.buffers()]:
        exclude[t.untyped_storage()] = True
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
             for p in module.parameters() if p.requires_grad]
    mode = LiveBytes(exclude)
    try:
        with torch.device(device), mode:
            loss = step()
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return mode.peak


@contextmanager
def on_meta():
    """Build modules on the meta device; a few libraries create tensors with legacy constructors
    (`torch.Tensor([x])`) that ignore the device context, so callers move the result with `.to("meta")`."""
    with torch.device("meta"):
        yield


@dataclass
class Counts:
    """Parameter counts of a model, per component, split trainable / frozen."""

    trainable: dict[str, int] = field(default_factory=dict)
    frozen: dict[str, int] = field(default_factory=dict)
    largest_block: int = 0  # params of the largest FSDP block unit
    largest_root: int = 0  # params a component unit holds outside its blocks (gathered for its whole forward)
    frozen_inputs: int = 0  # frozen encoder params that precomputed inputs take off the GPU

    @property
    def total_trainable(self) -> int:
        return sum(self.trainable.values())

    @property
    def total_frozen(self) -> int:
        return sum(self.frozen.values())


def count(model: nn.Module) -> Counts:
    c = Counts()
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "generator" else parts[0]
        bucket = c.trainable if p.requires_grad else c.frozen
        bucket[key] = bucket.get(key, 0) + p.numel()
    for unit in component_units(model).values():
        blocks = blocks_of(unit)
        in_blocks = 0
        for block in blocks:
            n = sum(p.numel() for p in block.parameters())
            c.largest_block = max(c.largest_block, n)
            in_blocks += n
        c.largest_root = max(c.largest_root, sum(p.numel() for p in unit.parameters()) - in_blocks)
    return c


@dataclass
class Setting:
    strategy: str  # ddp | fsdp2
    checkpointing: bool
    precomputed: bool
    offload: bool = False

    @property
    def name(self) -> str:
        parts = [self.strategy]
        if self.checkpointing:
            parts.append("act. ckpt")
        if self.precomputed:
            parts.append("precomputed")
        if self.offload:
            parts.append("cpu offload")
        return " + ".join(parts)


def peak_bytes(s: Setting, c: Counts, activations: int, gpus: int, compute_bytes: int, frozen_bytes: int,
               multi: bool = True) -> dict:
    """Per-GPU bytes of one setting: weights + optimizer state, gradients, gathered blocks, activations.

    Gradients are freed after each optimizer step (set_to_none) and arrive during backward while
    the activations are being freed, so the step's transient peak is the larger of the two. The
    measured activations include autocast's low-precision copies of the weights. `multi`: DDP over
    several processes keeps its gradient buckets for the whole run."""
    t = c.total_trainable
    f = c.total_frozen - (c.frozen_inputs if s.precomputed else 0)
    if s.strategy == "ddp":
        static = 12 * t + frozen_bytes * f + (4 * t if multi else 0)
        grads, gathered = 4 * t, 0
    else:
        static = 0 if s.offload else (12 * t + frozen_bytes * f) / gpus
        grads = 0 if s.offload else 4 * t / gpus
        gathered = compute_bytes * (c.largest_root + 2 * c.largest_block) + (compute_bytes + 4) * c.largest_block
    total = static + gathered + max(activations, grads) + RESERVE
    return {"static": static, "grads": grads, "gathered": gathered, "activations": activations, "total": total}


def settings(gpus: int, precomputed_ok: bool = True) -> list[Setting]:
    """From the simplest to the most memory-saving: the first that fits is the one to use."""
    out = []
    for strategy in (["ddp"] if gpus < 2 else ["ddp", "fsdp2"]):
        for precomputed in (False, True) if precomputed_ok else (False,):
            for checkpointing in (False, True):
                out.append(Setting(strategy, checkpointing, precomputed))
    if gpus >= 2:
        out.append(Setting("fsdp2", True, precomputed_ok, offload=True))
    return out


def checkpointable(model: nn.Module) -> list[str]:
    """Components that store activations in a training step (they train, or grads pass through them)."""
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    return [c for c in COMPONENTS if c in trainable and c != "input_adapter"]


# --- the plan of a recipe ----------------------------------------------------------------------


def build_on_meta(recipe, precomputed: bool = False):
    """The recipe's stage with every parameter on the meta device (no memory, no weights read);
    `precomputed`: as data.precomputed=true builds it (the frozen encoders left out)."""
    from dataclasses import replace
    from pandora_lightning.training.stage import STAGES
    from pandora_lightning.training.vocabulary import needs_vocabulary, resolve_vocabulary

    vocabulary: list[str] = []
    if needs_vocabulary(recipe):
        try:
            vocabulary = resolve_vocabulary(recipe, from_checkpoints=False)
        except (PandoraError, OSError):  # no data here: the tiny tokenizers' size hardly matters for a plan
            vocabulary = [f"w{i}" for i in range(64)]
    if precomputed != recipe.data.precomputed:
        recipe = replace(recipe, data=replace(recipe.data, precomputed=precomputed))
    stage = STAGES[recipe.stage].from_recipe(recipe, vocabulary, meta=True)  # WorldModel builds on meta
    with on_meta():  # the stage's own layers (LoRA)
        return stage.to("meta")


def plan_batch(recipe, batch_size: int, device="meta", full_model=None) -> dict:
    """A batch of the recipe's size; with `full_model` (the stage's model with its encoders, on meta),
    the batch of precomputed inputs a data.precomputed loader gives (the encoders' outputs)."""
    g = recipe.model.generator
    height, width = (getattr(g, "height", None) or g.image_size), (getattr(g, "width", None) or g.image_size)
    frames = torch.zeros(batch_size, g.frames, 3, height, width, dtype=torch.uint8, device=device)
    batch = {"frames": frames, "text": ["move the object to the left"] * batch_size}
    if full_model is not None:
        batch["encoded"] = precomputed_inputs(full_model, frames, batch["text"])
        if not full_model.generator.needs_frames:
            del batch["frames"]
    return batch


def precomputed_inputs(model, frames: torch.Tensor, texts: list[str]) -> dict[str, torch.Tensor]:
    """What `shards encode` stores for a batch, cut to its windows: the frozen encoders run on meta."""
    from pandora_lightning.data.frames import to_model_range

    x = to_model_range(frames)
    with torch.no_grad(), MetaScalars():
        out = {"vision": model.vision_features(x[:, : model.cond_frames])}
        out |= {f"gen.{k}": v for k, v in model.generator.precompute(x).items()}
        if model.text_encoder is not None:
            out["teacher"] = out["teacher_empty"] = model.teacher_context(texts)
    return out


def measure_activations(stage, recipe, batch_size: int, checkpointing: list[str], batch: dict | None = None) -> int:
    """Peak activation bytes of one training step of `stage` on meta (checkpointing switched on first)."""
    from pandora_lightning.training.parallel import apply_activation_checkpointing

    dtype = _compute_dtype(recipe.trainer.precision)
    if checkpointing:
        # the recomputation in backward runs outside the modes of the forward: give it the same rules
        apply_activation_checkpointing(stage.model, checkpointing, context_fn=lambda: (_nothing(), MetaAutocast(dtype)))
    stage.train()
    batch = batch or plan_batch(recipe, batch_size)
    with MetaAutocast(dtype):
        return measure_step(stage, lambda: stage.losses(batch)["loss"])


@contextmanager
def _nothing():
    yield


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """scaled_dot_product_attention through the memory-efficient kernel's op (it has meta shapes)."""
    if k.shape[-3] != q.shape[-3]:  # grouped-query attention: the kernel wants as many k/v heads as q heads
        repeat = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(repeat, dim=-3), v.repeat_interleave(repeat, dim=-3)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
    if attn_mask is not None:
        attn_mask = attn_mask.to(q.dtype).expand(q.shape[0], q.shape[-3], q.shape[-2], k.shape[-2])
    grad = q.requires_grad or k.requires_grad or v.requires_grad
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, grad, dropout_p, is_causal,
                                                                  scale=scale)[0]


class MetaAutocast(TorchFunctionMode):
    """What a GPU step does that meta tensors would not: torch.autocast's casting rules (matmuls,
    convolutions and attention in the low dtype; normalisations, softmax and losses in fp32) and
    fused attention (flash / memory-efficient kernels store the output and a log-sum-exp, never
    the L x L attention matrix that the math fallback meta would take stores). It acts above
    autograd, so what backward saves is what a GPU run saves. dtype float32: no casting."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        F = torch.nn.functional
        self.low = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                    torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm, F.scaled_dot_product_attention,
                    torch.Tensor.__matmul__, torch.Tensor.matmul, torch.Tensor.bmm, torch.einsum,
                    # composites whose inner calls the mode does not see (it is off while its handler runs)
                    F.multi_head_attention_forward}
        self.high = {F.group_norm, F.layer_norm, F.softmax, F.log_softmax, torch.softmax, torch.Tensor.softmax,
                     F.mse_loss, F.cross_entropy, torch.exp, torch.Tensor.exp, torch.Tensor.pow, torch.pow,
                     torch.Tensor.norm, torch.norm, torch.nn.functional.rms_norm}

    def _cast(self, args, kwargs, frm, to):
        def cast(x):
            return x.to(to) if isinstance(x, torch.Tensor) and x.dtype == frm else x

        return tree_map(cast, args), tree_map(cast, kwargs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.dtype == torch.float32:
            return _fused_attention(*args, **kwargs) if func is torch.nn.functional.scaled_dot_product_attention \
                else func(*args, **kwargs)
        if func is torch.nn.functional.scaled_dot_product_attention:
            args, kwargs = self._cast(args, kwargs, torch.float32, self.dtype)
            return _fused_attention(*args, **kwargs)
        if func in self.low:
            args, kwargs = self._cast(args, kwargs, torch.float32, self.dtype)
        elif func in self.high:
            args, kwargs = self._cast(args, kwargs, self.dtype, torch.float32)
        return func(*args, **kwargs)


def _compute_dtype(precision: str) -> torch.dtype:
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def make_plan(recipe, gpus: int, gpu_memory_gib: float = 80.0, batch_size: int | None = None) -> dict:
    """Counts, measured activations and per-GPU peak of every setting; the first that fits."""
    batch = batch_size or recipe.data.batch_size
    recipe.loss.text_dropout = 0.0  # random text dropout reads values; the plan's batch keeps every text
    stage = build_on_meta(recipe)
    counts = count(stage.model)
    ckpt = checkpointable(stage.model)
    compute = 2 if _compute_dtype(recipe.trainer.precision) != torch.float32 else 4
    try:
        without = build_on_meta(recipe, precomputed=True)
        counts.frozen_inputs = sum(p.numel() for p in stage.model.parameters()) - sum(p.numel() for p in without.model.parameters())
        inputs, no_precomputed = plan_batch(recipe, batch, full_model=stage.model), None
    except PandoraError as err:  # the family or the recipe cannot train from precomputed inputs
        no_precomputed = str(err)
    activations = {}
    for checkpointing in (False, True):
        for precomputed in (False, True) if no_precomputed is None else (False,):
            activations[(checkpointing, precomputed)] = measure_activations(
                build_on_meta(recipe, precomputed), recipe, batch, ckpt if checkpointing else [],
                inputs if precomputed else None)
    rows = [(s, peak_bytes(s, counts, activations[(s.checkpointing, s.precomputed)], gpus, compute, compute, multi=gpus > 1))
            for s in settings(gpus, no_precomputed is None)]
    return {"recipe": recipe, "gpus": gpus, "batch": batch, "counts": counts, "checkpointable": ckpt,
            "no_precomputed": no_precomputed, **choose(rows, gpu_memory_gib)}


def choose(rows: list, gpu_memory_gib: float) -> dict:
    """Mark what fits in `gpu_memory_gib` with the headroom; the first (simplest) that fits is the best."""
    for _, mem in rows:
        mem["fits"] = mem["total"] <= (1 - HEADROOM) * gpu_memory_gib * GiB
    return {"rows": rows, "gpu_memory": gpu_memory_gib, "best": next(((s, m) for s, m in rows if m["fits"]), None)}


def format_plan(plan: dict) -> str:
    c: Counts = plan["counts"]
    recipe = plan["recipe"]
    g = recipe.model.generator
    size = f"{getattr(g, 'height', None) or g.image_size}x{getattr(g, 'width', None) or g.image_size}"
    lines = [f"plan for {recipe.stage} ({recipe.name}) on {plan['gpus']} GPU(s) x {plan['gpu_memory']:g} GiB, "
             f"batch {plan['batch']} per GPU, clips of {g.frames} frames at {size}, precision {recipe.trainer.precision}", ""]
    width = max(len(k) for k in {**c.trainable, **c.frozen})
    lines.append(f"{'component':<{width}}  {'parameters':>14}  {'trainable':>14}")
    for key in sorted({**c.trainable, **c.frozen}, key=lambda k: [*dict.fromkeys(n.split('.')[0] for n in (*c.trainable, *c.frozen))].index(k.split('.')[0])):
        on, off = c.trainable.get(key, 0), c.frozen.get(key, 0)
        lines.append(f"{key:<{width}}  {on + off:>14,}  {on:>14,}")
    total = c.total_trainable + c.total_frozen
    lines.append(f"{'total':<{width}}  {total:>14,}  {c.total_trainable:>14,}  "
                 f"({100 * c.total_trainable / max(1, total):.1f}% trainable)")
    lines += ["", f"activations measured by a meta-device training step; checkpointing covers {plan['checkpointable']}; "
              f"+{RESERVE / GiB:.1f} GiB reserve for the CUDA context and allocator; fits = at most "
              f"{100 * (1 - HEADROOM):.0f}% of the GPU", ""]
    if plan.get("no_precomputed"):
        lines += [f"no precomputed rows: {plan['no_precomputed']}", ""]
    lines.append(f"{'setting':<46} {'weights+optim':>13} {'grads':>9} {'gathered':>9} {'activations':>11} {'peak/GPU':>9}  fits")
    for s, m in plan["rows"]:
        lines.append(f"{s.name:<46} {_gib(m['static']):>13} {_gib(m['grads']):>9} {_gib(m['gathered']):>9} "
                     f"{_gib(m['activations']):>11} {_gib(m['total']):>9}  {'yes' if m['fits'] else 'no'}")
    lines.append("")
    if plan["best"] is None:
        lines.append("nothing fits: lower data.batch_size or generator.frames, or use more GPUs")
    else:
        s, m = plan["best"]
        lines.append(f"smallest setting that fits: {s.name} ({m['total'] / GiB:.1f} of {plan['gpu_memory']:g} GiB, "
                     f"{100 * (1 - m['total'] / (plan['gpu_memory'] * GiB)):.0f}% headroom)")
        lines.append("  recipe overrides: " + " ".join(recipe_overrides(s, plan["checkpointable"])))
    return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:.0f} MiB"


def recipe_overrides(s: Setting, checkpointable_components: list[str]) -> list[str]:
    out = [f"parallel.strategy={s.strategy}"]
    if s.checkpointing:
        out.append(f"parallel.activation_checkpointing=[{','.join(checkpointable_components)}]")
    if s.offload:
        out.append("parallel.cpu_offload=true")
    if s.precomputed:
        out.append("data.precomputed=true (after `pandora-lightning shards encode`)")
    return out
