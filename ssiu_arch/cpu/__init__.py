"""The CPU engine: compiled kernels (``csrc/``), row bands and malloc awareness for inference, and a training path
with backward kernels (``training.py``)."""
