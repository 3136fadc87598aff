"""The offline reward over-optimization benchmark (`python -m experiments.overopt`, `r2m overopt`); see README.md."""
