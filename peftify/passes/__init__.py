"""Methods: one file per family, each a registered hyperparameter dataclass plus the module it
builds (see `base` for the protocol). Importing this package registers them all.
"""

from peftify.passes.base import METHODS, Method, SiteModule, register
from peftify.passes.dora import DoRA
from peftify.passes.lora import LoRA

__all__ = ["METHODS", "DoRA", "LoRA", "Method", "SiteModule", "register"]
