"""Meta-device start-up under fsdp2: each rank reads only its shard of every pretrained weight.

With `parallel.meta_init` (the fsdp2 default) a stage is built lazily (`WorldModel(lazy=True)`):
components read from a pretrained folder get their parameters on the meta device (their buffers,
rotary frequencies and position ids, are computed by their constructors as usual); everything else
(adapters, query tokens, tiny components, LoRA A/B) is built on the CPU exactly as a full build
builds it, with the same random draws. Then, inside `configure_model`:

1. `LazyWeights.take_snapshot`: the tensors that were built (not meta) are kept aside and the whole
   model goes to the meta device;
2. `fully_shard` turns every parameter into a DTensor whose placement says which part is this rank's;
3. `LazyWeights.materialize`: `to_empty` allocates the local shards, and each is filled from the
   `init_from` file (what an earlier stage trained), else from the snapshot, else from the folder's
   safetensors, reading only the rows (Shard(0)) this rank holds.

Host memory per rank is then one shard of the pretrained weights plus the small built parts,
instead of every weight of every component on every rank. Every tensor's source is checked against
the files' headers before training starts (`LazyWeights.check`): a missing tensor or a shape that
differs is one line naming the key and the folder.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pandora_lightning.errors import PandoraError
from pandora_lightning.models.weight_files import WeightFiles

SNAPSHOT, FOLDER, INIT_FROM = "snapshot", "folder", "init_from"


class TensorDict:
    """In-memory tensors (a checkpoint that is not a safetensors file) behind WeightFiles' interface."""

    def __init__(self, tensors: dict[str, torch.Tensor], what: str):
        self.tensors, self.what, self.folder = tensors, what, what

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def read(self, key: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        return self.tensors[key][index] if index else self.tensors[key]

    def close(self) -> None:
        self.tensors = {}


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by its first name (tied tensors once)."""
    return dict(model.named_parameters()) | dict(model.named_buffers())


def folder_key(name: str, prefix: str) -> str:
    """A model tensor name -> its key in the folder of the component at `prefix` (peft's base_layer removed)."""
    return name[len(prefix) + 1:].replace(".base_layer.", ".")


class LazyWeights:
    """Where each tensor of a lazily built WorldModel comes from, and the filling of its local shards."""

    def __init__(self, model: nn.Module):
        present = {name for name, _ in model.named_modules()}
        folders = {p: f for p, f in model.pretrained_modules().items() if p in present}
        self.folders = {prefix: WeightFiles(folder, f"pretrained {prefix}") for prefix, folder in folders.items()}
        # The dtype each pretrained tensor was built in (what a full build reads the file into first).
        self.read_dtypes = {n.replace(".base_layer.", "."): t.dtype for n, t in named_tensors(model).items() if t.is_meta}
        self.init_from: WeightFiles | TensorDict | None = None
        self.init_from_keys: dict[str, str] = {}  # model name -> key in the init_from file
        self.plan: dict[str, tuple[str, str, str]] = {}  # model name -> (source, folder prefix, key)
        self.snapshot: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, str] = {}  # second names of shared parameters -> their first name

    def set_init_from(self, source: WeightFiles | TensorDict, keys: dict[str, str]) -> None:
        self.init_from, self.init_from_keys = source, keys

    def _folder_of(self, name: str) -> str | None:
        matches = [p for p in self.folders if name.startswith(p + ".")]
        return max(matches, key=len) if matches else None

    def check(self, model: nn.Module) -> None:
        """Decide every tensor's source and check it against the files' headers (one line if one cannot work)."""
        stored_buffers = set(model.state_dict(keep_vars=True)) - {n for n, _ in model.named_parameters()}
        self.plan = {}
        for name, tensor in named_tensors(model).items():
            prefix = self._folder_of(name)
            if name in self.init_from_keys:
                files, key = self.init_from, self.init_from_keys[name]
                self.plan[name] = (INIT_FROM, "", key)
            elif prefix is not None and (tensor.is_meta or (name in stored_buffers and folder_key(name, prefix) in self.folders[prefix])):
                # a pretrained weight, or a persistent buffer the folder stores (a full build reads it too)
                files, key = self.folders[prefix], folder_key(name, prefix)
                self.plan[name] = (FOLDER, prefix, key)
            elif not tensor.is_meta:
                self.plan[name] = (SNAPSHOT, "", name)
                continue
            else:
                raise PandoraError(f"parallel.meta_init: {name} is on the meta device and no folder or checkpoint provides it; "
                                   f"set parallel.meta_init=false")
            if key not in files:
                raise PandoraError(f"parallel.meta_init: '{files.folder}' has no tensor '{key}' (for {name}); the "
                                   f"folder is incomplete or holds another model: download it again")
            if files.shape(key) != tuple(tensor.shape):
                raise PandoraError(f"parallel.meta_init: tensor '{key}' in '{files.folder}' is {list(files.shape(key))}, "
                                   f"but {name} built from its config is {list(tensor.shape)}: the folder's config and weights disagree")

    def take_snapshot(self, model: nn.Module) -> None:
        """Keep aside the tensors that were built (their values are the full build's), then put the model on meta."""
        if not self.plan:
            self.check(model)
        tensors = named_tensors(model)
        self.snapshot = {n: tensors[n].detach() for n, (source, _, _) in self.plan.items() if source == SNAPSHOT}
        self.aliases = _aliases(model)
        model.to("meta")

    @torch.no_grad()
    def materialize(self, model: nn.Module, device: torch.device) -> dict[str, int]:
        """Allocate this rank's shards on `device` and fill each from its source; returns elements filled per source."""
        model.to_empty(device=device)
        filled = {SNAPSHOT: 0, FOLDER: 0, INIT_FROM: 0}
        for alias, name in self.aliases.items():  # to_empty makes each module's parameters anew: tie them again
            param = model.get_parameter(name)
            if not _is_dtensor(param) and model.get_parameter(alias) is not param:
                owner, _, leaf = alias.rpartition(".")
                setattr(model.get_submodule(owner), leaf, param)
        tensors = named_tensors(model)
        for alias in self.aliases:  # sharded ones: FSDP2 ties its gathered copies in forward; fill both shards alike
            tensors.setdefault(alias, model.get_parameter(alias))
        for name, tensor in tensors.items():
            entry = self.plan[self.aliases.get(name, name)]
            local = tensor.to_local() if _is_dtensor(tensor) else tensor
            index = local_index(tensor)
            if index is None:  # a placement other than Shard/Replicate: distribute the full tensor
                from torch.distributed.tensor import distribute_tensor

                full = self._read(*entry, ()).to(tensor.dtype)
                local.copy_(distribute_tensor(full, tensor.device_mesh, tensor.placements).to_local())
            elif local.numel():
                local.copy_(self._read(*entry, index))
            filled[entry[0]] += local.numel()
        self.snapshot = {}
        for files in [*self.folders.values(), *([self.init_from] if self.init_from is not None else [])]:
            files.close()
        return filled

    def _read(self, source: str, prefix: str, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        if source == SNAPSHOT:
            full = self.snapshot[key]
            return full[index] if index else full
        if source == INIT_FROM:
            return self.init_from.read(key, index)
        # as a full build: the file's tensor in the dtype the component was built in, then the model's own
        out = self.folders[prefix].read(key, index)
        return out.to(self.read_dtypes.get(f"{prefix}.{key}", out.dtype))


def _aliases(model: nn.Module) -> dict[str, str]:
    """Second names of shared parameters -> their first name."""
    first: dict[int, str] = {}
    out = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            out[name] = first[id(param)]
        else:
            first[id(param)] = name
    return out


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_index(tensor: torch.Tensor) -> tuple[slice, ...] | None:
    """The part of the full tensor this rank holds, as one slice per dimension (() for a plain tensor),
    from a DTensor's mesh coordinate and placements (Shard(d): torch.chunk's split, the last ranks
    may hold fewer or no rows); None for placements this does not compute (then the caller distributes)."""
    if not _is_dtensor(tensor):
        return ()
    from torch.distributed.tensor import Shard

    mesh, coordinate = tensor.device_mesh, tensor.device_mesh.get_coordinate()
    if coordinate is None:
        return None
    bounds = [[0, size] for size in tensor.shape]
    for mesh_dim, placement in enumerate(tensor.placements):
        if placement.is_replicate():
            continue
        if type(placement) is not Shard:
            return None
        start, stop = bounds[placement.dim]
        size, parts = stop - start, mesh.size(mesh_dim)
        chunk = -(-size // parts)
        lo = min(coordinate[mesh_dim] * chunk, size)
        bounds[placement.dim] = [start + lo, start + min(lo + chunk, size)]
    if [b - a for a, b in bounds] != list(tensor.to_local().shape):
        return None
    return tuple(slice(a, b) for a, b in bounds)


def init_device(mesh, cpu_offload: bool) -> torch.device:
    """Where the local shards live: the mesh's accelerator (the current one), or the host under CPU offload."""
    if cpu_offload or mesh.device_type == "cpu":
        return torch.device("cpu")
    module = getattr(torch, mesh.device_type)
    return torch.device(mesh.device_type, module.current_device())


def init_from_source(path: str | Path, ckpt_state: dict | None):
    """The init_from checkpoint as a source: a safetensors model file is read lazily, other forms from `ckpt_state`."""
    if ckpt_state is None:
        return WeightFiles(path, f"init_from '{path}'")
    return TensorDict(ckpt_state, f"init_from '{path}'")
