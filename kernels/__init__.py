"""Triton kernels of r1vl_fast, installed as ``r1vl_fast.kernels`` (never as a top-level ``kernels``)."""
