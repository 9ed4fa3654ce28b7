"""LoRA on the world model's components with peft: where adapters go, which one is active, merging.

Each adaptable component has one peft base model: the LLM's causal LM (`llm.model`), the
generator's denoiser (`generator.backbone`: its UNet or transformer) and the output adapter. Adapters are injected with peft's
`inject_adapter_in_model`, so parameter names stay the component's own plus peft's
`lora_A.<adapter>` / `lora_B.<adapter>`, and one component can hold several named adapters.
"""
from __future__ import annotations

import re
import warnings
from contextlib import contextmanager

import torch

from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from pandora_lightning.errors import PandoraError
from pandora_lightning.training.recipe import LORA_COMPONENTS, ComponentLora, LoraConfig

# Default targets: peft regexes over module names (re.fullmatch). Diffusers names the attention
# projections to_q / to_k / to_v / to_out.0 in every video backbone (spatial transformer_blocks,
# temporal_transformer_blocks, UNet3D's temp_attentions and transformer_in, Wan's blocks), and the
# feed-forward layers ff / ff_in / ffn with net.0.proj and net.2.
ATTENTION = {
    "llm": r".*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    "generator": r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    "output_adapter": r".*\.(attention|crossattention)\.(attention\.(query|key|value)|output\.dense)",
}
FEED_FORWARD = {
    "llm": r".*\.mlp\.(gate_proj|up_proj|down_proj)",
    "generator": r".*\.(ff|ff_in|ffn)\.net\.(0\.proj|2)",
    "output_adapter": r".*\.(intermediate_query|output_query)\.dense",
}
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def lora_base(model: nn.Module, component: str) -> nn.Module:
    """The module peft wraps for `component`: what `PeftModel.from_pretrained` is given."""
    if component == "llm":
        return model.llm.model
    if component == "generator":
        return model.generator.backbone  # the UNet, or Wan's transformer
    if component == "output_adapter":
        return model.output_adapter
    raise PandoraError(f"LoRA component '{component}' is unknown; use one of {LORA_COMPONENTS}")


def peft_targets(component: str, cfg: ComponentLora) -> str | list[str]:
    """peft's target_modules for a component: the configured names / "re:" regex, or the defaults."""
    if cfg.target_modules:
        names = list(cfg.target_modules)
        regexes = [n for n in names if n.startswith("re:")]
        if regexes and len(names) > 1:
            raise PandoraError(f"lora.{component}.target_modules: give layer names or one 're:<regex>', not both ({names})")
        return regexes[0][3:] if regexes else names
    return f"{ATTENTION[component]}|{FEED_FORWARD[component]}" if cfg.feed_forward else ATTENTION[component]


def _layer_kinds(module: nn.Module) -> list[str]:
    """The distinct short names (last part; two parts for `to_out.0`-style) of a module's layers."""
    short = []
    for name, sub in module.named_modules():
        if isinstance(sub, _LAYERS) and "lora_" not in name and not name.endswith("base_layer"):
            parts = name.split(".")
            tail = ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
            if tail not in short:
                short.append(tail)
    return short


def target_layers(module: nn.Module, component: str, targets: str | list[str]) -> list[str]:
    """The module names `targets` select; a target that selects no layer is an error naming the layers."""
    layers = [n for n, m in module.named_modules() if isinstance(m, _LAYERS) and "lora_" not in n]
    layers = [n.removesuffix(".base_layer") for n in layers]
    if isinstance(targets, str):
        chosen = [n for n in layers if re.fullmatch(targets, n)]
        empty = [] if chosen else [f"re:{targets}"]
    else:
        ends = lambda n, t: n == t or n.endswith("." + t)  # noqa: E731 (peft's own rule for names)
        chosen = [n for n in layers if any(ends(n, t) for t in targets)]
        empty = [t for t in targets if not any(ends(n, t) for n in layers)]
    if empty:
        raise PandoraError(
            f"lora.{component}.target_modules {empty} match no layer of the {component} ({type(module).__name__}); "
            f"its layers are named: {', '.join(_layer_kinds(module))}"
        )
    return sorted(set(chosen))


def adapter_names(module: nn.Module) -> list[str]:
    """The adapters injected into a peft base module."""
    return sorted(getattr(module, "peft_config", {}))


def add_lora(model: nn.Module, cfg: LoraConfig) -> dict[str, list[str]]:
    """Inject adapter `cfg.name` into every component with rank > 0; returns the layers adapted per component.
    Over weights on the meta device (a lazily built component) the adapters get the values they get over
    loaded weights (see `cpu_stand_ins`)."""
    adapted = {}
    for component, part in cfg.components().items():
        module = lora_base(model, component)
        targets = peft_targets(component, part)
        adapted[component] = target_layers(module, component, targets)
        if cfg.name in adapter_names(module):
            raise PandoraError(f"the {component} already holds an adapter named '{cfg.name}'; give the new one another name")
        peft_cfg = PeftLoraConfig(r=part.rank, lora_alpha=part.alpha, lora_dropout=part.dropout, target_modules=targets)
        with cpu_stand_ins(module, adapted[component]):
            inject(peft_cfg, module, cfg.name)
    return adapted


def inject(peft_cfg: PeftLoraConfig, module: nn.Module, name: str) -> None:
    """peft's inject_adapter_in_model, quiet about the second adapter on one module (that is the point)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(peft_cfg, module, adapter_name=name)


@contextmanager
def cpu_stand_ins(module: nn.Module, names: list[str]):
    """peft puts a new adapter on its base layer's device: over a base weight on the meta device (a lazily
    built component) the adapter's initial values would be lost. While active, each such weight of the
    layers `names` is replaced by a CPU stand-in of its shape and dtype holding one element (a zero-stride
    view), so the adapters are made and kept on the CPU exactly as over a loaded weight; then put back."""
    swapped = []
    for name in names:
        layer = module.get_submodule(name)
        layer = getattr(layer, "base_layer", layer)
        weight = getattr(layer, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.is_meta:
            layer.weight = nn.Parameter(torch.zeros((), dtype=weight.dtype).expand(weight.shape), weight.requires_grad)
            swapped.append((layer, weight))
    try:
        yield
    finally:
        for layer, weight in swapped:
            layer.weight = weight


def tuner_layers(module: nn.Module) -> list[tuple[str, BaseTunerLayer]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]


def use_adapter(model: nn.Module, name: str | None) -> None:
    """Run adapter `name` in every component that holds it (the others run their base); None = no adapter."""
    for component in LORA_COMPONENTS:
        module = lora_base(model, component)
        active = name is not None and name in adapter_names(module)
        for _, layer in tuner_layers(module):
            layer.enable_adapters(active)
            if active:
                layer.set_adapter(name, inference_mode=True)


def merge_lora(model: nn.Module) -> int:
    """Fold every component's active adapters into its base weights and remove all LoRA layers.

    What stays is a plain model whose outputs equal the adapted model's (to float rounding).
    Returns the number of layers merged.
    """
    merged = 0
    for component in LORA_COMPONENTS:
        module = lora_base(model, component)
        for name, layer in tuner_layers(module):
            if layer.active_adapters and not layer.disable_adapters:
                layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, layer.get_base_layer())
            merged += 1
        if hasattr(module, "peft_config"):
            del module.peft_config
    return merged
