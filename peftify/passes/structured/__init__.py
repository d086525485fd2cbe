"""Structured replacements of a dense layer: one file per structure (`lowrank`, `blockdiag`
(BlockDense), `monarch`, `btt`, `sltrain` (sparse + low rank), `kron`), sharing init modes, μP
scales and the projection report in `common`; `schedule` holds the self-guided training schedule. They compute through
the ``torch.ops.peftify`` ops of `peftify.codegen.ops`.
"""

from peftify.passes.structured.blockdiag import BlockDiag
from peftify.passes.structured.btt import BTT
from peftify.passes.structured.kron import Kron
from peftify.passes.structured.lowrank import LowRank
from peftify.passes.structured.monarch import Monarch
from peftify.passes.structured.schedule import SelfGuided
from peftify.passes.structured.sltrain import SLTrain

__all__ = ["BTT", "BlockDiag", "Kron", "LowRank", "Monarch", "SLTrain", "SelfGuided"]
