"""A kohya sd-scripts layout stand-in written for the tests (random init, tiny sizes; no sd-scripts code)."""
