"""The one place koopnet's version is written (pyproject reads it too)."""

__version__ = "0.2.0"
