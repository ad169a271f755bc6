"""The `ewc` callback (being written)."""
