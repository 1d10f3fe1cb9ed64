"""A test layout shaped like current ComfyUI (late 2025): our own code, not a copy of theirs."""
