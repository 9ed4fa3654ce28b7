"""How a stage is spread over processes: the recipe's `parallel` block -> a Lightning strategy and,
inside `configure_model`, activation checkpointing, per-block `torch.compile` and FSDP2 sharding.

The model is a plain nn.Module with no parallelism inside it (as in torchtitan); everything here is
applied from the outside, per component:

- `ddp`: every rank holds the whole model; gradients are all-reduced.
- `fsdp2`: `fully_shard` (through Lightning's ModelParallelStrategy) on every repeated block of every
  component, frozen ones too, then on the component itself (the module whose forward the stage
  calls), so each rank holds 1/N of every weight and gathers one block at a time. Sharded
  checkpoints (torch.distributed.checkpoint folders) hold the trainable tensors and the optimizer
  state only, and load on any number of ranks.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils.checkpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from pandora_lightning.errors import PandoraError

STRATEGIES = ("auto", "ddp", "fsdp2")
COMPONENTS = ("vision", "input_adapter", "llm", "output_adapter", "generator", "text_encoder")
PARAM_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Repeated blocks, by class name: each is one FSDP unit (gathered on its own, freed after use), one
# activation-checkpointing region (the libraries' own switches) and one torch.compile region.
BLOCKS = frozenset({
    # transformers: LLMs, vision towers, text encoders, the Q-Former
    "LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "GemmaDecoderLayer", "CLIPEncoderLayer",
    "SiglipEncoderLayer", "Blip2QFormerLayer", "T5Block", "UMT5Block",
    # diffusers: UNet and VAE blocks, DiT blocks
    "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal", "UNetMidBlockSpatioTemporal",
    "CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal", "CrossAttnDownBlock3D", "DownBlock3D",
    "UNetMidBlock3DCrossAttn", "CrossAttnUpBlock3D", "UpBlock3D", "DownEncoderBlock2D", "UpDecoderBlock2D",
    "UNetMidBlock2D", "MidBlockTemporalDecoder", "UpBlockTemporalDecoder", "WanTransformerBlock",
    "CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D", "UpBlock2D",
})


@dataclass
class ParallelConfig:
    """The recipe's `parallel` block."""

    # auto: trainer.strategy as written (Lightning's own strings); ddp; fsdp2 (sharded, see above).
    strategy: str = "auto"
    # fsdp2: dtype the weights are gathered and computed in (gradients are reduced in fp32);
    # auto = bf16 under trainer.precision bf16-*, fp16 under 16-*, else fp32.
    param_dtype: str = "auto"
    # fsdp2: free each block's gathered weights after its forward (gathered again for backward):
    # less memory, one more all-gather per block.
    reshard_after_forward: bool = True
    # fsdp2: keep the sharded weights, gradients and optimizer state in host memory (CPU Adam step).
    cpu_offload: bool = False
    # Components whose blocks recompute their activations in backward instead of storing them,
    # e.g. [llm, generator]. Only components that train (or sit between trainable ones) store any.
    activation_checkpointing: list[str] = field(default_factory=list)
    compile: bool = False  # torch.compile every block (GPU; needs a C++ compiler on CPU)
    accumulate_grad_batches: int = 1  # micro-batches per optimizer step
    # ddp: tolerate parameters without a gradient in a step (the tiny recipes have some).
    find_unused_parameters: bool = True
    # fsdp2: build the pretrained components on the meta device and let each rank read only its
    # shard of every weight from the folders' safetensors after sharding (see training/materialize.py);
    # false: every rank builds the whole model on the CPU first, as ddp does.
    meta_init: bool = True

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"parallel.strategy='{self.strategy}' is unknown; use one of {STRATEGIES}")
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(f"parallel.param_dtype='{self.param_dtype}' is unknown; use one of {sorted(PARAM_DTYPES)}")
        unknown = [c for c in self.activation_checkpointing if c not in COMPONENTS]
        if unknown:
            raise ValueError(f"parallel.activation_checkpointing names {unknown}; components are {list(COMPONENTS)}")
        if self.accumulate_grad_batches < 1:
            raise ValueError(f"parallel.accumulate_grad_batches={self.accumulate_grad_batches} must be >= 1")
        if self.strategy != "fsdp2" and (self.cpu_offload or self.param_dtype != "auto"):
            raise ValueError("parallel.cpu_offload and parallel.param_dtype are fsdp2 settings; set parallel.strategy=fsdp2")

    @property
    def lazy(self) -> bool:
        """Whether a stage is built with its pretrained weights on the meta device, read per rank later."""
        return self.strategy == "fsdp2" and self.meta_init

    def gather_dtype(self, precision: str) -> torch.dtype | None:
        if self.param_dtype != "auto":
            return PARAM_DTYPES[self.param_dtype]
        if precision.startswith("bf16"):
            return torch.bfloat16
        if precision.startswith("16"):
            return torch.float16
        return None


# --- which modules are units -------------------------------------------------------------------


def blocks_of(module: nn.Module) -> list[nn.Module]:
    """The outermost repeated blocks inside `module`, in order."""
    found: list[nn.Module] = []

    def visit(parent: nn.Module) -> None:
        for child in parent.children():
            if type(child).__name__ in BLOCKS:
                found.append(child)
            else:
                visit(child)

    visit(module)
    return found


def component_units(model: nn.Module) -> dict[str, nn.Module]:
    """Component -> the modules whose forward (or encode/decode) the stage calls, by name."""
    units: dict[str, nn.Module] = {}
    for name in COMPONENTS:
        comp = getattr(model, name, None)
        if comp is None or not any(True for _ in comp.parameters()):
            continue
        if name == "generator":
            # The stage calls the UNet's forward and the VAE's encode/decode, not the generator's forward.
            for part in ("unet", "vae", "transformer"):
                if isinstance(getattr(comp, part, None), nn.Module):
                    units[f"generator.{part}"] = getattr(comp, part)
        else:
            units[name] = comp
    return units


# --- applied in configure_model ----------------------------------------------------------------


def apply_activation_checkpointing(model: nn.Module, components: list[str], **checkpoint_kwargs) -> list[str]:
    """Turn on the libraries' own gradient checkpointing (per block, non-reentrant) in `components`.

    transformers and diffusers pass each layer's keyword arguments (masks, positions) through their
    own checkpointing correctly and only recompute in training mode. `checkpoint_kwargs` go to
    torch.utils.checkpoint.checkpoint (e.g. `context_fn`). Returns the modules switched on.
    """
    kwargs = {"use_reentrant": False, **checkpoint_kwargs}

    def diffusers_checkpoint(module, *args):
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, **kwargs)

    switched = []
    for unit_name, unit in component_units(model).items():
        if unit_name.split(".")[0] not in components:
            continue
        for name, module in unit.named_modules():
            if getattr(module, "supports_gradient_checkpointing", False) and hasattr(module, "activation_checkpointing_enable"):
                module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            elif getattr(module, "supports_gradient_checkpointing", False) and hasattr(module, "gradient_checkpointing_enable"):
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            elif getattr(module, "_supports_gradient_checkpointing", False) and hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing(diffusers_checkpoint)
            else:
                continue
            switched.append(f"{unit_name}.{name}".rstrip("."))
    missing = [c for c in components if not any(s.split(".")[0] == c for s in switched)]
    if missing:
        raise PandoraError(
            f"parallel.activation_checkpointing={list(components)}: {missing} have no transformers/diffusers "
            f"model that supports gradient checkpointing; drop them from the list"
        )
    return switched


def apply_compile(model: nn.Module) -> int:
    """torch.compile every block in place (parameter names do not change); returns how many."""
    blocks = [b for unit in component_units(model).values() for b in blocks_of(unit)]
    for block in blocks:
        block.compile()
    return len(blocks)


def apply_fsdp2(model: nn.Module, mesh, cfg: ParallelConfig, precision: str) -> list[str]:
    """fully_shard every block of every component, then the component; returns the unit names."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    kwargs: dict = {"mesh": mesh, "reshard_after_forward": cfg.reshard_after_forward}
    dtype = cfg.gather_dtype(precision)
    if dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    if cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    names = []
    for unit_name, unit in component_units(model).items():
        for i, block in enumerate(blocks_of(unit)):
            fully_shard(block, **kwargs)
            names.append(f"{unit_name}.block{i}:{type(block).__name__}")
        fully_shard(unit, **kwargs)
        names.append(unit_name)
        for method in ("encode", "decode"):  # VAEs: the stage calls these, not forward
            if unit_name == "generator.vae" and hasattr(unit, method):
                register_fsdp_forward_method(unit, method)
    leftover = [n for n, p in model.named_parameters() if not _is_dtensor(p)]
    if leftover:
        raise PandoraError(f"parallel.strategy=fsdp2: parameters {leftover[:3]} belong to no component unit")
    return names


def full_state_dict(model: nn.Module) -> dict | None:
    """A sharded (fsdp2) model's full state dict on rank 0, on CPU (a collective: every rank calls
    it; the others get an empty dict); None for a model that is not sharded."""
    if not any(_is_dtensor(p) for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


_GROUP_ENDED = False


def end_process_group() -> None:
    """Tear down the ranks' process group once a run is over (a no-op in a single process). Left to
    interpreter shutdown, gloo's worker threads can still hold tensors while Python is finalized and
    the rank dies with SIGABRT ("terminate called without an active exception") after the run has
    finished: a failed job to SLURM. A bare 2-rank gloo script here: 11 of 30 runs without this, 0 of
    30 with it. A sharded model's device mesh still holds the group, though (see `leave_process`)."""
    import torch.distributed as dist

    global _GROUP_ENDED
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _GROUP_ENDED = True


def leave_process(code: int = 0) -> None:
    """End a rank of a finished multi-process run without Python's shutdown (a no-op when no process
    group was ended here). Its group is destroyed, but a sharded model's device mesh (fsdp2) still
    refers to it, and the gloo threads it keeps met interpreter shutdown and aborted the rank: a 2-rank
    gloo script holding a device mesh aborted 14 of 30 runs after destroy_process_group, 0 of 20 when it
    left with os._exit. Output is flushed first; every file of the run is written and closed by then."""
    if not _GROUP_ENDED:
        return
    import logging
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def configure(stage, cfg: ParallelConfig, precision: str) -> None:
    """The stage's `configure_model`: checkpointing, compile, then sharding, in torchtitan's order; a
    lazily built stage (parallel.meta_init) goes to the meta device first and reads its shards last."""
    model = stage.model
    lazy = getattr(stage, "lazy_weights", None) if cfg.strategy == "fsdp2" else None
    if lazy is not None:
        lazy.take_snapshot(model)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model, list(cfg.activation_checkpointing))
    if cfg.compile:
        apply_compile(model)
    if cfg.strategy == "fsdp2":
        mesh = stage.device_mesh["data_parallel"]
        apply_fsdp2(model, mesh, cfg, precision)
        if lazy is not None:
            from pandora_lightning.training.materialize import init_device

            lazy.materialize(model, init_device(mesh, cfg.cpu_offload))


# --- the Lightning strategy --------------------------------------------------------------------


def world_processes(devices: int, num_nodes: int) -> int:
    return devices * num_nodes


def check_machine(cfg: ParallelConfig, devices: int, num_nodes: int, trainable: int = 0, frozen: int = 0) -> None:
    """Settings this machine cannot run, refused in one line before anything starts (the host
    memory check once the parameter counts are known)."""
    processes = world_processes(devices, num_nodes)
    if cfg.strategy == "fsdp2" and processes < 2:
        raise PandoraError(
            f"parallel.strategy=fsdp2 shards over processes, but trainer.devices={devices} x trainer.num_nodes={num_nodes} "
            f"= 1 process; use parallel.strategy=ddp (or auto) on one device, or raise trainer.devices"
        )
    if cfg.cpu_offload and trainable + frozen:
        # fp32 master weights, gradients and two Adam moments of the trainable part, frozen weights
        # in their own dtype (counted as 4 bytes, the worst case), shared by the ranks on this node.
        need = (16 * trainable + 4 * frozen) * devices / processes
        have = host_memory_bytes()
        if have and need > 0.9 * have:
            raise PandoraError(
                f"parallel.cpu_offload=true needs about {need / 2**30:.1f} GiB of host memory on each node for "
                f"{devices} rank(s), this machine has {have / 2**30:.1f} GiB; use more nodes or parallel.cpu_offload=false"
            )


def host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def build_strategy(cfg: ParallelConfig, trainer_strategy: str):
    """The Lightning strategy for the recipe (or trainer.strategy itself under parallel.strategy=auto)."""
    if cfg.strategy == "auto":
        return trainer_strategy
    if trainer_strategy != "auto":
        raise PandoraError(
            f"parallel.strategy={cfg.strategy} and trainer.strategy={trainer_strategy} both choose the strategy; "
            f"set trainer.strategy=auto"
        )
    if cfg.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=cfg.find_unused_parameters)
    return FSDP2Strategy()


def trainer_precision(cfg: ParallelConfig, precision: str) -> str:
    """Under fsdp2 the mixed-precision policy does the casting; Lightning then runs in fp32 (no autocast)."""
    return "32-true" if cfg.strategy == "fsdp2" else precision


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy as pure FSDP2 over every process (no tensor parallelism), whose sharded
    checkpoints hold what `model_file.saved_keys` names: no weight a pretrained folder provides."""

    def __init__(self):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=True)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def _kept(self) -> set[str]:
        from pandora_lightning.training.model_file import saved_keys

        return {f"model.{name}" for name in saved_keys(self.lightning_module.model)}

    def lightning_module_state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(cpu_offload=True))
        kept = self._kept()
        return {k: v for k, v in state.items() if k in kept}

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        from pandora_lightning.training.sharded import load_sharded_into

        path = Path(self.broadcast(str(checkpoint_path)))
        return load_sharded_into(path, self.model, self.optimizers, self._kept())

    @contextmanager
    def block_backward_sync(self):
        # Gradient accumulation: no reduce-scatter on the micro-batches before the last one.
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:
                unit.set_requires_gradient_sync(True, recurse=False)
