"""r2m.service: the reward server and its update worker, in rooms by role.

- `api/`: the HTTP edge. `app` assembles the FastAPI app; one router per route group (`score`, `embed`,
  `preferences`, `heads`, `health`, `get_reward`); `deps`, `payload` (both request encodings), `middleware` (size
  limit, memory budget, metrics), `drain` (the graceful stop).
- `update/`: the write side. `worker` (read, train, check, publish, acknowledge), `training` (one GREBT phase),
  `judge/` (the outside judge), `guard` (the canary checks), `fit` (`r2m fit-rm`).
- `kernels/`: CPU kernels of the feedback attention (`precision`, `widen`, `percore`); they import nothing of r2m.
- the read side, here: `model` (omega, the head, GREBT loss), `attention` (the feedback attention, trainable and as
  served), `backbone` (the frozen reward model; `device`, `members`), `initial` (head version 0), `scoring` (rewards
  from embeddings and a head), `engine` (backbone + the swappable head), `batcher`, `headsync` (a replica follows
  the store), `headstore`, `redisheads` and `headcodec` (versions, their Redis layout and their bytes), `queue`
  (the preference stream), `schemas` and `validation` (the wire requests), `config/` (the settings, their groups
  and derived defaults), `metrics`, `backoff`, `allocator`.
- `assemble` puts a replica's and a worker's parts together for the app and the CLI; `launch` starts real r2m
  processes on loopback.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("r2m")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
