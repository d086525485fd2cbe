"""Methods: one file per family, each a registered hyperparameter dataclass plus the module it
builds (see `base` for the protocol). Importing this package registers them all.
"""

from peftify.passes.base import METHODS, Method, SiteModule, register
from peftify.passes.bora import BoRA
from peftify.passes.clover import CLOVER
from peftify.passes.dora import DoRA
from peftify.passes.loldu import LoLDU
from peftify.passes.lora import LoRA
from peftify.passes.lora_xs import LoRAXS
from peftify.passes.map import MAP
from peftify.passes.svfit import SVFit
from peftify.passes.svft import SVFT
from peftify.passes.vectorfit import AdaptiveFreezing, VectorFit

__all__ = ["CLOVER", "MAP", "METHODS", "SVFT", "AdaptiveFreezing", "BoRA", "DoRA", "LoLDU", "LoRA", "LoRAXS", "Method", "SVFit", "SiteModule", "VectorFit", "register"]
