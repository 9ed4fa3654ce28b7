"""LightningModules, one per training stage, sharing `WorldModelStage`."""
from pandora_lightning import __version__
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
    version = str(meta.get("version"))
    # Before 1.0 a minor release may change the model layout: major.minor must match.
    if version.split(".")[:2] != __version__.split(".")[:2]:
        raise ConfigError(
            f"checkpoint '{path}' was written by pandora-lightning {version}; this is {__version__}, which reads "
            f"checkpoints of {'.'.join(__version__.split('.')[:2])}.x only"
        )
    module = STAGES[meta["stage"]](meta["recipe"])
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise ConfigError(f"checkpoint '{path}' does not match its own recipe's model: {str(err).splitlines()[0]}") from None
    return module.eval()
