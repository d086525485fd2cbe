"""The one exception type users catch for every spec or selection problem."""

from __future__ import annotations


class SpecError(ValueError):
    """A spec, rule, hyperparameter or selection that peftify cannot honour.

    ``rule`` (the rule's index and match, when one is to blame) and ``field`` (the offending
    key) are kept as attributes so callers can react programmatically; both are also in the
    message.
    """

    def __init__(self, message: str, *, rule: str | None = None, field: str | None = None):
        self.rule = rule
        self.field = field
        where = ", ".join(p for p in (rule, f"field {field!r}" if field else None) if p)
        super().__init__(f"{where}: {message}" if where else message)
