"""vitscale: pretrain Vision Transformers at scale."""

__version__ = "0.1.0"
