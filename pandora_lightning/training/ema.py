"""An exponential moving average of the trained weights (`trainer.ema_decay`).

The average starts from the weights a run starts with and follows every optimizer step:
average = decay * average + (1 - decay) * weights, for the trainable tensors only (the frozen ones never
change). It rides in every checkpoint (the callback's state), so a resumed run goes on exactly, and
`fit` writes the average, not the last weights, into the final model file.
"""
from __future__ import annotations

import lightning as L
import torch


class WeightEMA(L.Callback):
    def __init__(self, decay: float):
        self.decay = decay
        self.average: dict[str, torch.Tensor] | None = None  # trainable parameter name -> float32 average
        self.step = 0  # the optimizer step the average last took in

    @staticmethod
    def trained(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.average is None:  # a resumed run has it from its checkpoint already
            self.average = {name: p.detach().float().clone() for name, p in self.trained(pl_module).items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:  # a batch that only accumulated gradients
            return
        self.step = trainer.global_step
        params = self.trained(pl_module)
        with torch.no_grad():
            torch._foreach_lerp_([self.average[name] for name in params], [p.detach().float() for p in params.values()],
                                 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"average": self.average, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.average, self.step = state["average"], state["step"]

    def apply_to(self, pl_module: L.LightningModule) -> None:
        """Writes the average into the module's trainable weights (at the end of training)."""
        with torch.no_grad():
            for name, p in self.trained(pl_module).items():
                p.copy_(self.average[name].to(p.dtype))
