"""Methods: one file per family, each a registered hyperparameter dataclass plus the module it
builds. `base` holds the protocol (`Method`, `SiteModule`, `register`, `METHODS`) and what
methods share; the adapters are `lora` (with rsLoRA, PiSSA/OLoRA inits, LoRA+), `dora`, `bora`,
`map`, `lora_xs`, `svfit`, `svft`, `vectorfit` (with `AdaptiveFreezing`), `loldu` and `clover`;
the structured replacements live in `structured/`, the spec-level scaling rules (μP) in
`scaling`. Importing this package registers them all.
"""

from peftify.passes.base import METHODS, Method, SiteModule, register
from peftify.passes.bora import BoRA
from peftify.passes.clover import CLOVER
from peftify.passes.dora import DoRA
from peftify.passes.loldu import LoLDU
from peftify.passes.lora import LoRA
from peftify.passes.lora_xs import LoRAXS
from peftify.passes.map import MAP
from peftify.passes.scaling import MuP
from peftify.passes.structured import BTT, BlockDiag, Kron, LowRank, Monarch, SelfGuided, SLTrain
from peftify.passes.svfit import SVFit
from peftify.passes.svft import SVFT
from peftify.passes.vectorfit import AdaptiveFreezing, VectorFit

__all__ = [
    "BTT",
    "CLOVER",
    "MAP",
    "METHODS",
    "SVFT",
    "AdaptiveFreezing",
    "BlockDiag",
    "BoRA",
    "DoRA",
    "Kron",
    "LoLDU",
    "LoRA",
    "LoRAXS",
    "LowRank",
    "Method",
    "Monarch",
    "MuP",
    "SLTrain",
    "SVFit",
    "SelfGuided",
    "SiteModule",
    "VectorFit",
    "register",
]
