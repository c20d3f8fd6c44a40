"""Triton kernels, installed as ``imta_fast.kernels`` (never as a bare top-level ``kernels``)."""
