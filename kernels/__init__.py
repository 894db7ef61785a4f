"""Triton kernels of apm-fast (installed as ``apm_fast.kernels``)."""
