"""Self-guided training: anneal from a dense guide to the structure, then drop the guide."""

from __future__ import annotations

import torch
from torch import nn

from peftify.errors import SpecError


class SelfGuided:
    """The schedule of ``init="self_guided"`` sites ("Building on Efficient Foundations:
    Effectively Training LLMs with Structured Feedforward Layers", Wei et al.): each such layer
    computes α·G x + (1−α)·S(x) with a trainable dense guide G; every `step` lowers α linearly,
    α = 1 − t/steps, and at α = 0 the guides are dropped — removed from the model and, when
    `optimizer` is given, from its parameter groups and state, so their memory is freed.

        schedule = peftify.SelfGuided(model, steps=1000, optimizer=opt)
        for batch in data:
            loss(model(batch)).backward(); opt.step(); opt.zero_grad(); schedule.step()
    """

    def __init__(self, model: nn.Module, steps: int, optimizer: torch.optim.Optimizer | None = None):
        from peftify.passes.structured.common import StructuredModule

        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise SpecError(f"steps must be a positive integer, got {steps!r}", field="steps")
        self.modules = [m for m in model.modules() if isinstance(m, StructuredModule) and m.guide is not None]
        if not self.modules:
            raise SpecError("this model has no self-guided structured layers (init='self_guided')")
        # resume where the layers are (a model loaded mid-anneal keeps its α): α = 1 − t/steps
        self.steps, self.optimizer = steps, optimizer
        self.t = round((1.0 - float(self.modules[0].mix)) * steps)

    @property
    def alpha(self) -> float:
        """The dense guide's current share."""
        return max(0.0, 1.0 - self.t / self.steps)

    @property
    def done(self) -> bool:
        return self.t >= self.steps

    def step(self) -> None:
        """Advance one training step: α falls by 1/steps; at 0 the guides are dropped."""
        if self.done:
            return
        self.t += 1
        if not self.done:
            for m in self.modules:
                m.mix.fill_(self.alpha)
            return
        guides = {id(m.guide) for m in self.modules}
        for m in self.modules:
            m.drop_guide()
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                kept = [p for p in group["params"] if id(p) not in guides]
                for p in group["params"]:
                    if id(p) in guides:
                        self.optimizer.state.pop(p, None)
                group["params"] = kept
