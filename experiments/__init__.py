"""Offline experiments that measure r2m's method (installed as `r2m.experiments`)."""
