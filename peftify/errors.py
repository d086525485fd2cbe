"""The one exception type users catch for every spec or selection problem, and peftify's warnings."""

from __future__ import annotations

import os
import sys
import warnings

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep  # peftify's own frames start with it


class SpecError(ValueError):
    """A spec, rule, hyperparameter or selection that peftify cannot honour.

    ``rule`` (the rule's index and match, when one is to blame) and ``field`` (the offending
    key) are kept as attributes so callers can react programmatically; both are also in the
    message.
    """

    def __init__(self, message: str, *, rule: str | None = None, field: str | None = None):
        self.message = message  # without the location, to re-raise with another rule
        self.rule = rule
        self.field = field
        where = ", ".join(p for p in (rule, f"field {field!r}" if field else None) if p)
        super().__init__(f"{where}: {message}" if where else message)


def prefixed(prefix: str, error: SpecError) -> SpecError:
    """`error` with its whole message (location included) after `prefix`, keeping its rule and
    field for callers that react to them."""
    new = SpecError(f"{prefix}{error}")
    new.rule, new.field = error.rule, error.field
    return new


def warn(message: str) -> None:
    """Warn ``peftify: message``, attributed to the user's line that called into peftify (the
    first frame outside the package), however deep inside peftify the warning arises."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"peftify: {message}", stacklevel=level)


def shown(value, width: int = 40) -> str:
    """A value for an error message, at most `width` characters (Python will not even print an
    integer of over 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested thousands deep, or holding such an integer
        return f"a {type(value).__name__} too deep or large to show"
    return text if len(text) <= width else text[: width - 3] + "..."
