"""The exceptions qtool raises on purpose; the CLI turns exactly these into messages and exit codes.

Every message names the culprit (file, tensor, flag) and says what to do about it.
"""
from __future__ import annotations


class QtoolError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  -> {self.hint}"


class InputError(QtoolError):
    """The input (a checkpoint, a file, a config) is unusable as it is."""

    exit_code = 2


class UsageError(QtoolError):
    """Flags or settings that cannot work together; may carry several problems at once."""

    exit_code = 2

    def __init__(self, problems: list[str] | str, *, hint: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems) if len(self.problems) == 1 else
                         "\n".join(["several problems:"] + [f"  - {p}" for p in self.problems]), hint=hint)


class OutputError(QtoolError):
    """The output cannot be written (exists, disk full, permissions)."""

    exit_code = 3


class VerificationError(QtoolError):
    """A written result failed its own check (reconstruction error, hashes, logits)."""

    exit_code = 4
