"""The r2m reward service: the R2M model, the HTTP server and (later) the update worker."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("r2m")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
