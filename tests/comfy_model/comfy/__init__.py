"""A ComfyUI-layout stand-in written for the tests (random init, tiny sizes; no ComfyUI code)."""
