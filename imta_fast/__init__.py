"""imta_fast: fast, faithful training and serving of adaptive multi-exit image classifiers."""
__version__ = "0.1.0"
