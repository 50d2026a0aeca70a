"""The CPU inference engine: compiled kernels (``csrc/``), row bands and malloc awareness."""
