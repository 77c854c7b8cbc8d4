"""Compatibility alias for `refgen.tiny_qwen` while `refgen.cli` still imports `write_tiny_models` from here.

Delete this file once cli.py reads `from refgen.tiny_qwen import write_tiny_models`."""

from refgen.tiny_qwen import write_tiny_models  # noqa: F401
