"""Triton kernels of the fused attention operation (``halluguard.kernels``).

The pure-PyTorch reference of the same operation is ``halluguard.attention.reference``; it is the
CPU path and the oracle the kernels are tested against.
"""
