"""CUDA kernels (Triton, SDPA). Importing this package registers them."""
