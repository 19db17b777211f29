"""llmpipe: an orchestrated, reproducible pipeline that builds GPT-style language models from scratch."""

__version__ = "0.1.0"
