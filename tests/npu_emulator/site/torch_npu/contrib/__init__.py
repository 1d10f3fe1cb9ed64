"""EMULATED torch_npu.contrib (contract emulator)."""
