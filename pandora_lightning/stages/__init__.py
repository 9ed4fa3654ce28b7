"""LightningModules, one per training stage, sharing `WorldModelStage`."""
from pandora_lightning.config import ConfigError
from pandora_lightning.stages.align import AlignStage
from pandora_lightning.stages.base import WorldModelStage, load_checkpoint_file
from pandora_lightning.stages.instruct import InstructStage

STAGES: dict[str, type[WorldModelStage]] = {cls.stage: cls for cls in (AlignStage, InstructStage)}

__all__ = ["STAGES", "AlignStage", "InstructStage", "WorldModelStage", "load_checkpoint_file", "load_stage"]


def load_stage(path) -> WorldModelStage:
    """Rebuild the stage module a checkpoint was trained with and load its weights (on CPU, eval mode)."""
    ckpt = load_checkpoint_file(path)
    meta = ckpt["hyper_parameters"]
    if meta.get("stage") not in STAGES:
        raise ConfigError(f"checkpoint '{path}' is from an unknown stage '{meta.get('stage')}'; known: {sorted(STAGES)}")
    module = STAGES[meta["stage"]](meta["recipe"])
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()
