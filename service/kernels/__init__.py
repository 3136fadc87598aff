"""CPU kernels of the feedback attention: which dtype half-precision hidden states are read in (`precision`), their
widening a block at a time (`widen`) and the per-thread workers that share the blocks out (`percore`).

These modules import nothing of r2m: they are torch code with no knowledge of the service around them.
"""
