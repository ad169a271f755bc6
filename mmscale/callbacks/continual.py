"""The `replay` and `distill` callbacks (being written)."""
