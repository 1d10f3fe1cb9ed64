"""comfy.model_management: only the flag the Flux code reads (ComfyUI skips comfy-kitchen's
autograd-less kernels while training)."""

in_training = False
