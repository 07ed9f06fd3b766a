"""Triton kernels, one module per op family (installed as ``dlh_kernels.triton_kernels``).

Each module holds the forward and backward kernels of one family and their launch helpers:
no registration, no dispatch (that is ``dlh_kernels``'s job). ``common.py`` holds the few
@triton.jit helpers several families share (the GELU math, the grouped tile order).
"""
