"""Command-line tools: ``ssiu infer|export|convert|bench|results|lmdb`` and ``basicsr train|test``."""
