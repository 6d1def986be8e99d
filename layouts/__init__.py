"""ktpack.layouts."""
