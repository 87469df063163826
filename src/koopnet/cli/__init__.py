"""The command line: ``koopnet reproduce``, ``study``, ``report`` and the stages train, scale,
fit, evaluate (see :mod:`koopnet.cli.main`)."""

from koopnet.cli.main import main

__all__ = ["main"]
