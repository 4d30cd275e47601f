"""Triton kernels and their launchers, installed as `modkern.kernels`.

Importing this package requires triton. Nothing else in modkern imports it unless a Triton
backend is asked for (see `modkern.backends`)."""
