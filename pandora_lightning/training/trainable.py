"""Which parameters a stage trains: glob-based freezing and the printed table (LoRA injection: lora.py)."""
from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from pandora_lightning.errors import PandoraError


def set_trainable(model: nn.Module, patterns: list[str]) -> list[str]:
    """Train exactly the parameters whose names match a glob in `patterns`; freeze the rest.

    Whole components without a trainable parameter are also put in eval mode (see `frozen_children`).
    Returns the sorted trainable names.
    """
    names = [n for n, _ in model.named_parameters()]
    unused = [p for p in patterns if not any(fnmatchcase(n, p) for n in names)]
    if unused:
        roots = sorted({n.split(".")[0] for n in names})
        raise PandoraError(
            f"trainable patterns {unused} match no parameter; names start with one of {roots} "
            f"(e.g. 'generator.unet.*', 'llm.query_tokens', '*lora_*')"
        )
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(fnmatchcase(name, p) for p in patterns))
        if param.requires_grad:
            trainable.append(name)
    return sorted(trainable)


def frozen_children(model: nn.Module) -> list[nn.Module]:
    """Sub-modules with parameters, none of them trainable, as high up the tree as possible."""
    frozen = []

    def visit(module: nn.Module) -> None:
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            frozen.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return frozen


def trainable_table(model: nn.Module) -> str:
    """Per component: trainable and frozen parameter counts."""
    rows: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] in ("llm", "generator", "vision") else parts[0]
        row = rows.setdefault(key, [0, 0])
        row[0 if param.requires_grad else 1] += param.numel()
    width = max(len(k) for k in rows)
    lines = [f"{'component':<{width}}  {'trainable':>12}  {'frozen':>12}"]
    for key, (on, off) in rows.items():
        lines.append(f"{key:<{width}}  {on:>12,}  {off:>12,}")
    total_on, total_off = (sum(r[i] for r in rows.values()) for i in (0, 1))
    lines.append(f"{'total':<{width}}  {total_on:>12,}  {total_off:>12,}")
    return "\n".join(lines)
