"""peftify: rewrite a PyTorch model's dense linear maps like a compiler.

    model = peftify.peftify(model, spec)   # capture → plan → rewrite, in place
    print(peftify.plan(model, spec))       # the same, as a dry run
    peftify.merge(model)                   # back to dense weights and the original modules

Subpackages: `rewrite` (the engine: capture, sites, roles, spec, select, plan, apply),
`passes` (one file per method family, registered by name), `codegen` (the ops methods compute
through), `io` (PEFT configs and adapter files). Importing peftify never imports transformers, peft or triton.
"""

from peftify import passes
from peftify.api import (
    Report,
    adapters,
    capture,
    delete_adapter,
    disable_adapters,
    merge,
    param_groups,
    peftify,
    plan,
    report,
    set_adapter,
    unload,
)
from peftify.errors import SpecError
from peftify.io.adapters import adapter_state_dict, from_pretrained, load_adapter, load_adapter_state_dict, save_adapter
from peftify.io.export import export, load_package
from peftify.passes import *  # every method class, METHODS, MuP, SelfGuided, AdaptiveFreezing and the protocol (Method, SiteModule, register)
from peftify.rewrite.plan import Plan
from peftify.rewrite.sites import Capture, Site
from peftify.rewrite.spec import Rule, Spec

__version__ = "0.1.0"

__all__ = passes.__all__ + [
    "Capture",
    "Plan",
    "Report",
    "Rule",
    "Site",
    "Spec",
    "SpecError",
    "adapter_state_dict",
    "adapters",
    "capture",
    "delete_adapter",
    "disable_adapters",
    "export",
    "from_pretrained",
    "load_adapter",
    "load_adapter_state_dict",
    "load_package",
    "merge",
    "param_groups",
    "peftify",
    "plan",
    "report",
    "save_adapter",
    "set_adapter",
    "unload",
]
