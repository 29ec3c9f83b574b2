"""The policy questions' usage error, apart from the evaluator so that the CLI can raise and
catch it without importing the compiler (``ubimesh.policy.questions`` re-exports it)."""

from __future__ import annotations


class QuestionError(ValueError):
    """The question cannot be answered as asked; the message names the flag, the value and
    the fix."""
