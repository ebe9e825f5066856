"""Grouped-matmul kernels: Pallas TPU, Pallas GPU, an XLA-only CPU path and the reference."""
