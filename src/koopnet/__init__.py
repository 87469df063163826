"""koopnet: replace layers of trained networks with linear Koopman operators."""

__version__ = "0.1.0"
