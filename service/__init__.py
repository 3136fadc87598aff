"""r2m.service: the reward server and its update worker.

The R2M model (`model`: feedback attention, omega schedule, score head, GREBT loss) on a frozen reward-model
backbone (`backbone`) is served by the scoring engine (`engine`) behind the FastAPI app (`app`, routes in `api/`);
the worker (`worker`, one training step in `training`) consumes preference batches from the queue (`queue`) and
publishes head versions to the store (`headstore`, bytes in `headcodec`) that every replica follows (`headsync`).
`launch` starts real r2m processes on loopback.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("r2m")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
