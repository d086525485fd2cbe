"""CLOVER: orthogonalize attention's Q–K and V–O pairs per head; train (or prune) singular values."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftify.errors import SpecError, warn
from peftify.passes.base import Method, SiteModule, check_count, dense_flops, invalid, progress_bar, register
from peftify.rewrite.sites import Site

ROLES = ("attn.q", "attn.k", "attn.v", "attn.o")
ROPES = ("auto", "none", "half")
# modules that normalize q or k per head after the projections (Qwen3, OLMo2, Gemma3, Cohere)
QK_NORMS = {"q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_norm", "key_norm", "q_ln", "k_ln"}
# transformers models whose rotary embedding pairs dimensions (2j, 2j+1), not (j, j + d/2)
INTERLEAVED_ROPE = {
    "gptj", "codegen", "cohere", "cohere2", "helium", "glm", "glm4", "chatglm", "ernie4_5", "ernie4_5_moe", "ernie4_5_vl_moe_text",
    "llama4", "llama4_text", "moonshine", "moonshine_streaming", "blt", "blt_global_transformer", "blt_local_decoder", "blt_local_encoder",
}  # fmt: skip


def _partial_rotary(params) -> float | None:
    """A partial rotary factor in a config's rope_parameters, also nested per layer type
    ({"full_attention": {..., "partial_rotary_factor": 0.5}})."""
    if not isinstance(params, dict):
        return None
    found = [params.get("partial_rotary_factor")] + [v.get("partial_rotary_factor") for v in params.values() if isinstance(v, dict)]
    return next((f for f in found if f not in (None, 1, 1.0)), None)


def attention_role(site: Site) -> str | None:
    found = [r for r in ROLES if r in site.roles]
    return found[0] if len(found) == 1 else None


@register("clover")
@dataclass(frozen=True)
class CLOVER(Method):
    """Per key/value head g and the query heads h that read it, the pair products are factored
    by SVD and the pair rewritten from the factors, so the products (the attention logits and
    the attention output) are unchanged:

        [Q_hᵀ K_g]_h = [U_h] S Vᵀ  →  Q_h ← U_hᵀ,  K_g ← diag(σ) Vᵀ     (σ = S at init)
        [O_h V_g]_h  = [U_h] S Vᵀ  →  O_h ← U_h,   V_g ← diag(σ) Vᵀ

    (Q_h, K_g, V_g: head_dim × in row blocks; O_h: out × head_dim column block.) The new Q rows
    and O columns are orthonormal across the group, and only σ trains. With rotary position
    embeddings ("half": HF's rotate_half layout) the Q–K pair is factored per rotary frequency,
    the only transforms that commute with the rotation: each frequency's (q, k) pair is a complex
    number, K's pair of rows is made orthogonal by a phase, and σ is one scale per frequency.
    `prune=ε` zeroes the directions whose σ is below ε × the largest σ of their head (the
    paper's redundancy elimination); each module's summary gives the parameters removed and the
    relative error of its pair product. Paper: "CLOVER: Cross-Layer Orthogonal Vectors Pruning
    and Fine-Tuning".

    - heads, kv_heads: query and key/value head counts; None reads the model's config.
    - rope: "auto" (from the config), "none", or "half".
    - prune: relative threshold ε (0: nothing pruned).
    """

    rewrites_base: ClassVar[bool] = True
    needs_roles: ClassVar[bool] = True
    init_needs_weights: ClassVar[bool] = True

    heads: int | None = None
    kv_heads: int | None = None
    rope: str = "auto"
    prune: float = 0.0

    def __post_init__(self):
        check_count("heads", self.heads, optional=True)
        check_count("kv_heads", self.kv_heads, optional=True)
        if self.rope not in ROPES:
            invalid("rope", f"must be one of {ROPES}, got {self.rope!r}")
        if not isinstance(self.prune, (int, float)) or not 0 <= self.prune < 1:
            invalid("prune", f"must be in [0, 1), got {self.prune!r}")

    def resolve(self, model: nn.Module) -> CLOVER:
        cfg = getattr(model, "config", None)
        heads = self.heads or getattr(cfg, "num_attention_heads", None)
        kv = self.kv_heads or getattr(cfg, "num_key_value_heads", None) or heads
        # q and k normalized after their projections: the per-head rewrite does not commute with it
        norms = [n for n, _ in model.named_modules() if n.rpartition(".")[2] in QK_NORMS] or (["use_qk_norm"] if getattr(cfg, "use_qk_norm", False) else [])
        if norms:
            invalid("match", f"the model normalizes q and k after their projections ({', '.join(norms[:2])}{', …' if len(norms) > 2 else ''}), which CLOVER's factoring does not commute with")
        rope = self.rope
        params = getattr(cfg, "rope_parameters", None) or {}
        rotary = any(getattr(cfg, key, None) for key in ("rope_scaling", "rope_theta", "rotary_dim", "rotary_pct", "rotary_emb_base", "partial_rotary_factor"))
        rotary = rotary or bool(params)
        if rope == "none" and rotary:
            invalid("rope", "the model's config has rotary embeddings (rope_theta, rope_parameters or rotary_dim): rope='none' would rewrite q and k as if nothing rotated them, which changes the attention; leave rope='auto'")
        if rope == "auto" and cfg is None:
            warn("clover: rope='auto' reads the model's config, and this model has none: it assumes no rotary embedding (pass rope='half' for rotate_half rotary embeddings)")
        if rope == "auto":
            rope = "half" if rotary else "none"
        if rope == "half" and cfg is not None:  # what the config says the rotation is, given or found
            partial = getattr(cfg, "partial_rotary_factor", None) or _partial_rotary(params)
            partial = partial or getattr(cfg, "rotary_pct", None)
            rotary_dim, head_dim = getattr(cfg, "rotary_dim", None), getattr(cfg, "head_dim", None) or (getattr(cfg, "hidden_size", 0) // heads if heads else None)
            if partial not in (None, 1, 1.0) or (rotary_dim is not None and rotary_dim != head_dim):
                part = f"partial_rotary_factor={partial}" if partial not in (None, 1, 1.0) else f"rotary_dim={rotary_dim} of {head_dim}"
                invalid("rope", f"the model rotates only part of each head ({part}); CLOVER supports full rotate_half rotary embeddings")
            if getattr(cfg, "model_type", None) in INTERLEAVED_ROPE:
                invalid("rope", f"{cfg.model_type} rotates interleaved pairs of dimensions; CLOVER supports the rotate_half layout")
        return replace(self, heads=heads, kv_heads=kv, rope=rope)

    def check(self, site: Site) -> None:
        role = attention_role(site)
        if role is None:
            invalid("match", f"clover rewrites separate attention projections (roles {', '.join(ROLES)}); {site.fqn} has roles {sorted(site.roles) or 'none'}")
        if self.heads is None:
            invalid("heads", "the model's config has no num_attention_heads; give heads= (and kv_heads=)")
        if site.bias:
            invalid("match", f"{site.fqn} has a bias; clover supports bias-free attention projections")
        if site.transposed or site.kind != "module":
            invalid("match", f"{site.fqn} is not an nn.Linear module")
        if self.heads % self.kv_heads:
            invalid("kv_heads", f"{self.heads} query heads do not divide into {self.kv_heads} key/value heads")
        width = site.in_features if role == "attn.o" else site.out_features
        count = self.kv_heads if role in ("attn.k", "attn.v") else self.heads
        if width % count or (self.rope == "half" and (width // count) % 2):
            invalid("heads", f"{site.fqn}: {width} features do not split into {count} heads" + (" of even size" if self.rope == "half" else ""))
        # an SVD factors each head within the width it reads (K's and V's inputs, the group's O
        # outputs); the rotary Q–K factoring needs no SVD
        head, group = width // count, self.heads // self.kv_heads
        other = {"attn.v": site.in_features, "attn.k": site.in_features if self.rope != "half" else head, "attn.o": group * site.out_features}.get(role, head)
        if head > other:
            invalid("heads", f"{site.fqn}: heads of {head} features are wider than the {other} features clover factors each of them within")

    def trainable_params(self, site: Site) -> int:
        role = attention_role(site)
        if role == "attn.k":
            return site.out_features // (2 if self.rope == "half" else 1)
        return site.out_features if role == "attn.v" else 0

    def flops(self, site: Site) -> int:
        return dense_flops(site) + (site.out_features if self.trainable_params(site) else 0)

    PAIRS = (("attn.q", "attn.k"), ("attn.v", "attn.o"))

    @staticmethod
    def _by_layer(sites: list[Site]) -> dict[object, dict[str, int]]:
        """Each attention's sites by role, keyed by capture's attention id and the layer index: an
        encoder's and a decoder's block 0 (or a self- and a cross-attention) share a layer index,
        and the blocks of a model that applies attention in one shared module share an id."""
        by_layer: dict[object, dict[str, int]] = {}
        for i, site in enumerate(sites):
            by_layer.setdefault((site.attention, site.layer), {})[attention_role(site)] = i
        return by_layer

    def check_together(self, sites: list[Site]) -> None:
        """Each attention's q comes with its k and its v with its o, cut into heads of one size."""
        for layer, roles in self._by_layer(sites).items():
            attention, index = layer
            where = f"attention {attention or 'of the model'}" + (f" in layer {index}" if index is not None else "")
            for first, second in self.PAIRS:
                if (first in roles) != (second in roles):
                    have, lack = (first, second) if first in roles else (second, first)
                    raise SpecError(f"clover pairs {first} with {second}: {where} has {have} ({sites[roles[have]].fqn}) but no {lack} selected", field="match")
                if first in roles:
                    dims = {role: self._head_dim(sites[roles[role]]) for role in (first, second)}
                    if len(set(dims.values())) > 1:
                        raise SpecError(
                            f"clover: heads={self.heads}, kv_heads={self.kv_heads} cut {where}'s {first} and {second} into heads of "
                            f"different sizes ({', '.join(f'{r}: {d}' for r, d in dims.items())}); give the model's head counts",
                            field="heads",
                        )

    def build_many(self, items: list[tuple[Site, torch.Tensor]], progress: bool | None = None) -> list[SiteModule]:
        sites = [site for site, _ in items]
        self.check_together(sites)
        out: list[SiteModule | None] = [None] * len(items)
        for _layer, roles in progress_bar(list(self._by_layer(sites).items()), "peftify: clover", progress, unit="layer"):
            for (first, second), factor in zip(self.PAIRS, (self._qk, self._vo)):
                if first in roles:
                    a, b = roles[first], roles[second]
                    out[a], out[b] = factor(items[a], items[b])
        return out

    def _head_dim(self, site: Site) -> int:
        role = attention_role(site)
        width = site.in_features if role == "attn.o" else site.out_features
        return width // (self.kv_heads if role in ("attn.k", "attn.v") else self.heads)

    def _qk(self, q_item, k_item):
        (q_site, q), (k_site, k) = q_item, k_item
        g, n = self.kv_heads, self.heads // self.kv_heads
        d = k.shape[0] // g
        dtype = torch.float64
        qh = q.to(dtype).reshape(g, n, d, -1)  # (group, head in group, d, in)
        kh = k.to(dtype).reshape(g, d, -1)
        if self.rope == "half":
            new_q, sigma, new_k = _qk_rotary(qh, kh)
        else:
            u, sigma, v = _pair_svd(qh.transpose(1, 2).reshape(g, d, -1).mT, kh.mT)  # (n·in × d), (d), (in × d)
            new_q = u.mT.reshape(g, d, n, -1).transpose(1, 2)
            new_k = v.mT
        # a pruned direction takes a K row and the group's n Q rows (two of each per rotary frequency)
        sigma, removed, error = self._prune(sigma, per_direction=q.shape[1] * (n + 1) * (2 if self.rope == "half" else 1))
        if removed:
            keep = (sigma != 0).to(dtype)
            keep_full = torch.cat([keep, keep], -1) if self.rope == "half" else keep
            new_q = new_q * keep_full[:, None, :, None]
            new_k = new_k * keep_full[..., None]
        q_mod = CLOVERModule(self, q_site, q, new_q.reshape(q.shape), None, 0, 0.0)
        k_mod = CLOVERModule(self, k_site, k, new_k.reshape(k.shape), sigma.reshape(-1), removed, error)
        return q_mod, k_mod

    def _vo(self, v_item, o_item):
        (v_site, v), (o_site, o) = v_item, o_item
        g, n = self.kv_heads, self.heads // self.kv_heads
        d = v.shape[0] // g
        dtype = torch.float64
        oh = o.to(dtype).reshape(o.shape[0], g, n, d).permute(1, 2, 0, 3).reshape(g, n * o.shape[0], d)  # [O_h] stacked
        vh = v.to(dtype).reshape(g, d, -1)
        u, sigma, right = _pair_svd(oh, vh.mT)
        sigma, removed, error = self._prune(sigma, per_direction=v.shape[1] + n * o.shape[0])  # a V row, n O columns
        keep = (sigma != 0).to(dtype)
        new_v = right.mT * keep[..., None]
        new_o = (u * keep[:, None, :]).reshape(g, n, o.shape[0], d).permute(2, 0, 1, 3).reshape(o.shape)
        v_mod = CLOVERModule(self, v_site, v, new_v.reshape(v.shape), sigma.reshape(-1), removed, error)
        o_mod = CLOVERModule(self, o_site, o, new_o, None, 0, 0.0)
        return v_mod, o_mod

    def _prune(self, sigma: torch.Tensor, per_direction: int) -> tuple[torch.Tensor, int, float]:
        """Zero σ below prune × its head's largest; (σ, parameters removed with σ itself, relative
        Frobenius error of the pair products)."""
        if not self.prune:
            return sigma, 0, 0.0
        drop = sigma < self.prune * sigma.amax(-1, keepdim=True)
        error = (sigma[drop].square().sum() / sigma.square().sum()).sqrt().item()
        return sigma.masked_fill(drop, 0), int(drop.sum()) * (per_direction + 1), error


def _pair_svd(left: torch.Tensor, right: torch.Tensor):
    """SVD of left · rightᵀ (batched; left m × d, right k × d, rank ≤ d) through two thin QRs:
    (U m × d, S d, V k × d) with left rightᵀ = U diag(S) Vᵀ."""
    q1, r1 = torch.linalg.qr(left)
    q2, r2 = torch.linalg.qr(right)
    p, s, rt = torch.linalg.svd(r1 @ r2.mT)
    return q1 @ p, s, q2 @ rt.mT


def _qk_rotary(qh: torch.Tensor, kh: torch.Tensor):
    """Per rotary frequency j (dims j and j + d/2, rotate_half layout), q_j and k_j as complex
    rows: K's pair is rotated by a phase to orthogonal rows and normalized, Q's pair scaled by
    the inverse conjugate (logits unchanged), then Q normalized with σ_j its norm."""
    half = kh.shape[1] // 2
    zk = torch.complex(kh[:, :half], kh[:, half:])  # (g, d/2, in)
    zq = torch.complex(qh[:, :, :half], qh[:, :, half:])  # (g, n, d/2, in)
    a, b = kh[:, :half], kh[:, half:]
    phi = 0.5 * torch.atan2(-2 * (a * b).sum(-1), a.square().sum(-1) - b.square().sum(-1))
    k_norm = zk.abs().square().sum(-1).sqrt().clamp_min(1e-300)
    phase = torch.polar(torch.ones_like(phi), phi)
    zk = zk * (phase / k_norm)[..., None]
    zq = zq * (phase * k_norm)[:, None, :, None]  # ÷ conj(c) with c = e^{iφ} / ‖z_k‖
    sigma = zq.abs().square().sum((1, 3)).sqrt()  # over the group's heads and inputs: (g, d/2)
    zq = zq / sigma.clamp_min(1e-300)[:, None, :, None]
    new_q = torch.cat([zq.real, zq.imag], 2)
    new_k = torch.cat([zk.real, zk.imag], 1)
    return new_q, sigma, new_k


class CLOVERModule(SiteModule):
    """One projection of a CLOVER pair: its rewritten weight becomes the base; the pair's σ
    (on the K or V side) scales its output."""

    one_sided_split = True  # q, k, v rewritten up to a transform of their rows, o of its columns

    def __init__(self, method: CLOVER, site: Site, weight: torch.Tensor, new_weight: torch.Tensor, sigma, removed: int, error: float):
        super().__init__(method, site)
        self.residual = new_weight.to(weight.dtype)
        self.register_buffer("original", weight, persistent=False)  # the weight before, to compute it while inactive
        self.sigma = nn.Parameter(sigma.to(weight.dtype)) if sigma is not None else None
        # a pruned direction's rows of the new weight are zero (on both sides of the pair), so its
        # σ scales nothing and gets no gradient: no mask, and the state dict alone says what is pruned
        self.removed, self.error = removed, error

    def scale(self) -> torch.Tensor | None:
        if self.sigma is None:
            return None
        s = self.sigma
        if self.method.rope == "half" and attention_role(self.site) == "attn.k":
            s = s.view(self.method.kv_heads, -1).repeat(1, 2).reshape(-1)
        return s

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        s = self.scale()
        return weight if s is None else s[:, None] * weight

    def original_weight(self, residual: torch.Tensor) -> torch.Tensor:
        return self.original

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        s = self.scale()
        y = F.linear(x, weight)
        return y if s is None else y * s

    def summary(self) -> str:
        if not self.method.prune or self.sigma is None:
            return ""
        return f"pruned {self.removed:,} params, pair error {self.error:.2e}"


