"""The write side: what turns posted preference batches into published head versions.

`worker` (the loop: read, skip what is applied, train, check, publish, acknowledge), `training` (one GREBT phase on a
batch flattened by `batch`), `judge/` (the outside judge that labels pairs of the posted groups), `guard` (the canary
checks a candidate head must pass) and `fit` (`r2m fit-rm`: an encoder RM's score head, offline). Nothing here
imports the HTTP edge (`r2m.service.api`).
"""
