"""Helpers shared by the tools and the BasicSR layer: atomic file writes, checkpoints, counting."""
