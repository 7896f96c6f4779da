"""flashmoe_native: run Mixture-of-Experts LLMs far larger than memory by streaming experts."""

from .bundled import default_model_path
from .engine import ContextLimitError, Engine, EngineState
from .format import ModelFormatError

__all__ = ["ContextLimitError", "Engine", "EngineState", "ModelFormatError", "default_model_path"]
__version__ = "0.1.0"
