"""CPU kernels: the fastest correct plain-torch forms (native SDPA, fused rms_norm / layer_norm,
complex-multiply RoPE). Importing this package registers them."""

from .. import import_op_files

import_op_files(__name__)
