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
    `optimizer` is given, from its parameter groups and state, so their memory is freed. It
    schedules the active adapter's layers; on a model whose layers are mid-anneal (a loaded
    adapter) it resumes at their α, with this schedule's `steps`, and a schedule built before
    such a load (a Trainer resuming inside ``train()``) goes on from the loaded α at its next step.

        schedule = peftify.SelfGuided(model, steps=1000, optimizer=opt)
        for batch in data:
            loss(model(batch)).backward(); opt.step(); opt.zero_grad(); schedule.step()
    """

    def __init__(self, model: nn.Module, steps: int, optimizer: torch.optim.Optimizer | None = None):
        from peftify.passes.structured.common import StructuredModule
        from peftify.rewrite.apply import adapted_site

        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise SpecError(f"steps must be a positive integer, got {steps!r}", field="steps")
        # every rewritten model inside `model` (itself, or one a wrapper holds: DDP, a larger model);
        # of each, the active adapter's layers alone: another adapter's structure may stand for its
        # layer too, and annealing it would move that layer towards its untrained factors
        rewritten = list({id(m._peftify): (m, m._peftify) for m in model.modules() if getattr(m, "_peftify", None) is not None}.values())  # a compiled wrapper shows its model's too
        layers = [adapted_site(m, e.site).adapters[state.current] for m, state in rewritten for e in state.plan.entries]
        self.modules = [m for layer in layers for m in layer.modules() if isinstance(m, StructuredModule) and m.guide is not None]
        if not self.modules:
            which = f"adapter {', '.join(sorted({repr(s.current) for _, s in rewritten}))} of this model" if rewritten else "this model"
            raise SpecError(f"{which} has no self-guided structured layers (init='self_guided') whose guides are still there")
        mixes = sorted({float(m.mix) for m in self.modules})
        if not 0.0 <= mixes[0] <= mixes[-1] <= 1.0 or mixes[-1] - mixes[0] > 1e-6:
            raise SpecError(f"the self-guided layers' α (their `mix` buffers) must agree and lie in [0, 1], got {mixes[0]:g} to {mixes[-1]:g}", field="mix")
        self.steps, self.optimizer = steps, optimizer
        self.t = self._resumed_t(mixes[0])
        self._note_written(mixes[0])
        self.dropped = False

    def _resumed_t(self, alpha: float) -> float:
        """The step at the layers' α = 1 − t/steps (a model loaded mid-anneal keeps its α), with
        any `steps`: t need not be whole; it is rounded where α's precision cannot tell it from a
        whole step (float32 α blurs t by steps·2⁻²⁴: 0.006 steps at 100k)."""
        t = (1.0 - alpha) * self.steps
        blur = max(1e-3, self.steps * torch.finfo(self.modules[0].mix.dtype).eps)
        return round(t) if abs(t - round(t)) <= blur else t

    def _note_written(self, alpha: float) -> None:
        """Remember the α the layers hold: each one's tensor and version counter (which any
        write moves), and the value, to within its dtype's precision."""
        self._written = [(m.mix, _version(m.mix)) for m in self.modules]
        self._written_alpha, self._written_eps = alpha, torch.finfo(self.modules[0].mix.dtype).eps

    def _alpha_loaded(self) -> float | None:
        """The α the layers took since this schedule last wrote one (a checkpoint loaded after it
        was built), or None where they hold its own, perhaps cast (``model.double()``: new tensors)."""
        if all(m.mix is mix and version is not None and _version(mix) == version for m, (mix, version) in zip(self.modules, self._written)):
            return None  # no write at all: no value to read (on a GPU, a sync)
        alpha = float(self.modules[0].mix)
        if abs(alpha - self._written_alpha) <= 2 * self._written_eps:
            self._note_written(self._written_alpha)
            return None
        return alpha

    @property
    def alpha(self) -> float:
        """The dense guide's current share."""
        return max(0.0, 1.0 - self.t / self.steps)

    @property
    def done(self) -> bool:
        """Whether the guides are dropped (the step that brings α to 0 drops them)."""
        return self.dropped

    def step(self) -> None:
        """Advance one training step: α falls by 1/steps; at 0 the guides are dropped."""
        if self.dropped:
            return
        if (loaded := self._alpha_loaded()) is not None:  # go on from a checkpoint's α
            self.t = self._resumed_t(loaded)
        self.t = min(self.t + 1, self.steps)
        if self.t < self.steps:
            for m in self.modules:
                m.mix.fill_(self.alpha)
            self._note_written(self.alpha)
            return
        # the guides, kept until every one is out of the optimizer too: a step stopped midway and
        # taken again still knows those of the layers it had dropped
        self._guides = getattr(self, "_guides", None) or [m.guide for m in self.modules if m.guide is not None]
        guides = {id(g) for g in self._guides}
        for m in self.modules:
            if m.guide is not None:
                m.drop_guide()
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                kept = [p for p in group["params"] if id(p) not in guides]
                for p in group["params"]:
                    if id(p) in guides:
                        self.optimizer.state.pop(p, None)
                group["params"] = kept
        self._guides, self.dropped = None, True


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        return None
