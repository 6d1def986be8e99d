"""Errors raised by the layout modules."""

from __future__ import annotations


class LayoutError(ValueError):
    """A tensor (shape, values or packed buffer) cannot be taken by a layout; the message names the rule."""
