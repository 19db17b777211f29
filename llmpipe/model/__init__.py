"""The model: config and presets, the GPT, attention backends, the KV cache, FLOP accounting, the planner.

Imports only torch, numpy and the standard library, so it runs on a bare GPU machine.
"""

from llmpipe.model.attention import causal_attention, resolve_backend
from llmpipe.model.cache import KVCache
from llmpipe.model.config import PRESETS, ModelConfig
from llmpipe.model.gpt import GPT

__all__ = ["GPT", "KVCache", "PRESETS", "ModelConfig", "causal_attention", "resolve_backend"]
