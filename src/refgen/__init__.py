"""refgen: identity injection for Qwen-Image, and DiTs trained from scratch."""

__version__ = "0.1.0"
