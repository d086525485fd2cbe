"""Spec-level scaling rules: settings every rule's method inherits."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from peftify.errors import SpecError, shown
from peftify.passes.base import Method


@dataclass(frozen=True)
class MuP:
    """Structure-aware μP for a model trained from scratch: every structured method of the spec
    inits with the spectral rule per factor (``init="auto"`` becomes ``"mup"``) and gets Adam
    learning-rate multipliers base_width / (num_factors · fan_in) relative to the learning rate
    set for a dense layer of width `base_width` ("Compute Better Spent: Replacing Dense Layers
    with Structured Matrices", Qiu et al.; "A Spectral Condition for Feature Learning", Yang et al.).

        {"rules": [...], "scaling": {"method": "mup", "base_width": 256}}

    - base_width: the width whose dense layer the learning rate was tuned for (default 256).
    """

    base_width: int = 256

    def __post_init__(self):
        if not isinstance(self.base_width, int) or isinstance(self.base_width, bool) or self.base_width < 1:
            raise SpecError(f"base_width must be a positive integer, got {self.base_width!r}", field="base_width")

    def configure(self, method: Method) -> Method:
        """`method` with this scaling's settings where it has the fields and left them open."""
        names = {f.name for f in dataclasses.fields(method)}
        changes = {}
        if "base_width" in names and method.base_width is None:
            changes["base_width"] = self.base_width
        if "init" in names and method.init == "auto":
            changes["init"] = "mup"
        return dataclasses.replace(method, **changes) if changes else method

    def to_dict(self) -> dict[str, Any]:
        """The dict form of a spec's ``scaling``."""
        return {"method": "mup", "base_width": self.base_width}


SCALINGS = {"mup": MuP}


def scaling_from_dict(d: Any) -> MuP | None:
    """A scaling rule from its dict form (None stays None)."""
    if d is None or isinstance(d, MuP):
        return d
    if not isinstance(d, dict) or not isinstance(d.get("method"), str) or d["method"] not in SCALINGS:
        raise SpecError(f"scaling must be a dict with 'method' in {sorted(SCALINGS)}, got {shown(d)}", field="scaling")
    d = dict(d)
    cls = SCALINGS[d.pop("method")]
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise SpecError(f"{cls.__name__} has no setting {min(unknown, key=repr)!r}", field="scaling")
    return cls(**d)
