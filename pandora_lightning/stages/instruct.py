"""Stage 2, instruction tuning: (state clip, action text) -> next clip, from the align checkpoint."""
from pandora_lightning.stages.base import WorldModelStage


class InstructStage(WorldModelStage):
    stage = "instruct"
    text_kind = "action"
