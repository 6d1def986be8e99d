"""ktpack.kernels."""
