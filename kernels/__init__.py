"""Triton kernels, installed as ``datadam_fast.kernels`` (never as a top-level ``kernels``)."""
