"""rmd: Cross-Resolution Distribution Matching Distillation for diffusers models."""

__version__ = "0.1.0"
