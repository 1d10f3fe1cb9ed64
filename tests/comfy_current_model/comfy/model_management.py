"""comfy.model_management layout: the training flag the Flux code reads (ComfyUI skips
comfy-kitchen's autograd-less kernels while `in_training`), the float64 probe `rope` asks, and the
interrupt check every `operations.*` forward runs first (`run_every_op`)."""

import torch

in_training = False
interrupt_processing = False


class InterruptProcessingException(Exception):
    pass


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    if interrupt_processing:
        interrupt_processing = False
        raise InterruptProcessingException()


def supports_fp64(device=None):
    return torch.device(device).type != "mps" if device is not None else True
