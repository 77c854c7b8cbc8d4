"""refgen: identity injection for Qwen-Image, and DiTs trained from scratch.

`from refgen import IdentityPipeline, SlotResidual, encode_identity` (refgen.pipeline) loads torch on first use
only, so `refgen --help` stays fast.
"""

__version__ = "0.1.0"

_API = ("IdentityPipeline", "SlotResidual", "SlotTokens", "load_person", "encode_identity", "InversionError")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from refgen import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'refgen' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
