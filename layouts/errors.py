"""Errors raised by the layout modules."""

from __future__ import annotations


class LayoutError(ValueError):
    """A tensor (shape, values or packed buffer) cannot be taken by a layout; the message names the rule."""


class ManifestError(ValueError):
    """A manifest is missing, malformed, or of a format version this reader does not read."""
