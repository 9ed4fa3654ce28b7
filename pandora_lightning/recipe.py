"""The full recipe of `fit`: the training recipe plus the fit-time evaluation block.

`training/` knows only `TrainingRecipe`; the evaluation settings are composed here, on top, so
that training never depends on evaluation (the scoring callback is added where the Trainer is
built, in `cli.py`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L

from pandora_lightning.config import load_structured
from pandora_lightning.errors import PandoraError
from pandora_lightning.evaluation.callback import ScoreCallback
from pandora_lightning.evaluation.config import EvalConfig
from pandora_lightning.evaluation.suite import EpisodeMetrics
from pandora_lightning.training.recipe import TrainingRecipe


@dataclass
class RecipeConfig(TrainingRecipe):
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> RecipeConfig:
    return load_structured(RecipeConfig, [path, list(overrides)], f"recipe {path}")


def score_callbacks(recipe: RecipeConfig, plugins: Sequence[EpisodeMetrics] = ()) -> list[L.Callback]:
    """The fit-time scoring callback when the recipe's eval block turns it on."""
    if recipe.eval.every_n_steps <= 0:
        return []
    if recipe.data.precomputed:
        raise PandoraError("eval.every_n_steps > 0 rolls the model out from frames, but data.precomputed leaves its encoders "
                           "out; set eval.every_n_steps=0 and score the checkpoint afterwards (`pandora-lightning score`)")
    return [ScoreCallback(recipe.eval, recipe.data.manifest, plugins, recipe.data.allow_commands)]
