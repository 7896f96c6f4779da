"""flashmoe_native: run Mixture-of-Experts LLMs far larger than memory by streaming experts."""

from . import _core

__all__ = ["_core"]
__version__ = "0.1.0"
