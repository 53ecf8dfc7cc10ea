"""The error the kernels' validation raises: what is wrong, in plain words, and where."""

from __future__ import annotations


class FieldError(ValueError):
    """A hyperparameter or schedule value that is not valid.

    ``field`` is where, as a path within the rule's or the schedule's dict form (``("lr",)``,
    ``("schedulers", 1, "step_size")``); empty when the whole is at fault.
    """

    def __init__(self, message: str, *field: str | int) -> None:
        super().__init__(message)
        self.field: tuple[str | int, ...] = field
