"""VectorFit: train W's singular values and bias, freezing the weakest vectors as training goes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftify.passes.base import FULL_PRECISION, Method, check_count, check_fits, invalid, register, singular_flops, tag, w_gemm_kept
from peftify.passes.svfit import SingularValues
from peftify.rewrite.sites import Site


@register("vectorfit")
@dataclass(frozen=True)
class VectorFit(Method):
    """W = U diag(σ) Vᵀ (+ the residual beyond the top p) with U, V frozen; σ and the layer's
    bias b train, computed as W' = W + U diag(σ − σ₀) Vᵀ, or with all singular values (the
    default) as x V diag(σ) Uᵀ without W (float32/64; half precision keeps W). σ = σ₀ at init:
    unchanged.
    `peftify.AdaptiveFreezing` (stepped by the training loop) freezes the vectors that change
    least. Paper: "VectorFit: Adaptive Singular & Bias Vector Fine-Tuning of Pre-trained
    Foundation Models".

    - r: how many leading singular values train; None: all of them, min(in, out), as in the
      paper.
    - bias: also train the layer's existing bias (where it has one).
    """

    r: int | None = None
    bias: bool = True

    def __post_init__(self):
        check_count("r", self.r, optional=True)
        if not isinstance(self.bias, bool):
            invalid("bias", f"must be true or false, got {self.bias!r}")

    def rank(self, site: Site) -> int:
        return self.r or min(site.in_features, site.out_features)

    def check(self, site: Site) -> None:
        check_fits(site, self.r, "singular values")

    def svd_rank(self, site: Site) -> int:
        return self.rank(site)

    def trains_base_bias(self) -> bool:
        return self.bias

    def trainable_params(self, site: Site) -> int:
        return self.rank(site) + (site.out_features if self.bias and site.bias else 0)

    def frozen_params(self, site: Site) -> int:
        return self.rank(site) * (site.out_features + site.in_features + 1)  # U, Vᵀ and σ₀

    def flops(self, site: Site) -> int:
        return singular_flops(site, self.rank(site))

    def flops_for(self, site: Site, dtype: torch.dtype) -> int:
        return self.flops(site) + w_gemm_kept(site, self.rank(site), dtype in FULL_PRECISION)


VectorFit.module = SingularValues


class AdaptiveFreezing:
    """VectorFit's adaptive vector freezing: call `step()` once per optimizer step; every `every`
    steps, the trainable vectors (each site's σ and each trained bias) whose training strength
    ‖v − v₀‖ / ‖v₀‖ is smallest are frozen, `fraction` of all vectors at a time, until
    `max_frozen` of them are. Frozen vectors keep their values and get no more gradients.

    ``schedule = peftify.AdaptiveFreezing(model, every=100, fraction=0.1, max_frozen=0.5)``

    To resume a run, save `state_dict()` beside the checkpoint and, on a model with the trained
    adapter loaded back, call `load_state_dict` on a new schedule: the step count, the frozen
    vectors and the bias values strengths are measured from come back.
    """

    def __init__(self, model: nn.Module, every: int = 100, fraction: float = 0.1, max_frozen: float = 0.5):
        from peftify.rewrite.apply import adapted_site, rewrite_state, trained_bias

        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if not 0 < fraction <= 1 or not 0 <= max_frozen <= 1:
            raise ValueError(f"fraction must be in (0, 1] and max_frozen in [0, 1], got {fraction!r}, {max_frozen!r}")
        state = rewrite_state(model, "freeze")
        self.vectors: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
        self.owners: dict[str, nn.Module] = {}  # the module holding each adapter σ
        self.bias_owners: dict[str, nn.Module] = {}  # the adapter module training each base bias
        for entry in state.plan.entries:
            if not isinstance(entry.method, VectorFit):
                continue
            site = adapted_site(model, entry.site)
            mod = site.adapters[state.current]
            # an experts site: each expert's σ is a vector of its own
            per_expert = {f"{entry.site.fqn}.{i}.sigma": m for i, m in enumerate(mod.experts)} if entry.site.experts else {f"{entry.site.fqn}.sigma": mod}
            for name, owner in per_expert.items():
                self.vectors[name] = (owner.sigma, owner.sigma0)
                self.owners[name] = owner
            bias = trained_bias(model, entry, site.base_layer)
            if bias is not None:
                self.vectors[f"{entry.site.fqn}.bias"] = (bias[1], bias[1].detach().clone())
                self.bias_owners[f"{entry.site.fqn}.bias"] = mod
        if not self.vectors:
            raise ValueError("the model's active adapter has no vectorfit sites")
        self.every, self.fraction, self.max_frozen = every, fraction, max_frozen
        self.steps = 0
        self.frozen: list[str] = []

    def strength(self) -> dict[str, float]:
        """‖v − v₀‖ / ‖v₀‖ of every vector."""
        with torch.no_grad():
            return {n: ((p - p0).norm() / p0.norm().clamp_min(1e-12)).item() for n, (p, p0) in self.vectors.items()}

    def step(self) -> list[str]:
        """Count one optimizer step; returns the names of the vectors frozen now (usually none)."""
        self.steps += 1
        if self.steps % self.every:
            return []
        budget = int(self.max_frozen * len(self.vectors)) - len(self.frozen)
        n = min(max(1, int(self.fraction * len(self.vectors))), budget)
        if n <= 0:
            return []
        strengths = self.strength()
        candidates = sorted((s, name) for name, s in strengths.items() if name not in self.frozen)
        now = [name for _, name in candidates[:n]]
        self._freeze(now)
        return now

    def _freeze(self, names: list[str]) -> None:
        for name in names:
            param = self.vectors[name][0]
            param.requires_grad_(False)
            param.grad = None
            if name in self.owners:  # an adapter's σ stays frozen when the adapter is re-activated
                tag(self.owners[name], "sigma", trainable=False)
            if name in self.bias_owners:  # and so does a bias
                self.bias_owners[name].trains_bias = False
        self.frozen += names

    def state_dict(self) -> dict:
        """What a resumed run needs: the settings, the step count, the frozen vectors and each
        trained bias's starting value (σ₀ is saved with the adapter)."""
        start = {n: v0.clone() for n, (_, v0) in self.vectors.items() if n not in self.owners}
        return {"every": self.every, "fraction": self.fraction, "max_frozen": self.max_frozen, "steps": self.steps, "frozen": list(self.frozen), "bias_start": start}

    def load_state_dict(self, state: dict) -> None:
        """Continue the schedule `state_dict` saved, on this model (the same vectorfit sites)."""
        biases = {n for n in self.vectors if n not in self.owners}
        differ = sorted((set(state["bias_start"]) ^ biases) | (set(state["frozen"]) - set(self.vectors)))
        if differ:
            raise ValueError(f"the schedule was saved for other vectorfit sites: {differ[:3]} differ")
        for name, start in state["bias_start"].items():
            self.vectors[name][1].copy_(start)
        self.every, self.fraction, self.max_frozen, self.steps = state["every"], state["fraction"], state["max_frozen"], state["steps"]
        self.frozen = []
        self._freeze(list(state["frozen"]))
