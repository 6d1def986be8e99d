"""ktpack.runtime."""
