"""EMULATED torch_npu.contrib.transfer_to_npu: records that it was imported and changes nothing
(the real module rewrites cuda -> npu process-wide; the emulator must not touch the test process)."""

from npu_emulator.record import CALLS

CALLS.append({"op": "contrib.transfer_to_npu", "args": {}, "tensors": {}, "explicit": set()})
