"""CUDA kernels: Triton fused ops (`triton_ops`) and SDPA attention (`attention`). Importing this
package registers them for backend "cuda"; triton itself loads at a kernel's first call."""

from . import attention, triton_ops  # noqa: F401  (registration side effects)
