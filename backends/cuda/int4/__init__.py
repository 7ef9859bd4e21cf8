"""INT4 linears for the CUDA backend: the op, its weight format, its numerics and its dispatch limits."""
