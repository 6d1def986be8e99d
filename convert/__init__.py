"""ktpack.convert."""
