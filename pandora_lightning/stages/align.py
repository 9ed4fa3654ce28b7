"""Stage 1, pretraining alignment: caption-steered generation aligns the LLM side with the generator."""
from pandora_lightning.stages.base import WorldModelStage


class AlignStage(WorldModelStage):
    stage = "align"
    text_kind = "caption"
