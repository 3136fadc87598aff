"""r2m.cli: the `r2m` command line, on top of every other part (`r2m --help`)."""

from .main import main

__all__ = ["main"]
