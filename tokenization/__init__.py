"""Tokenizing like vLLM: a model's tokenizer.json and chat template (model.py).

A package of its own because both sides need it: the router (the exact prefix index matches
token ids) and the simulator (its KV events then carry the same ids a real replica's would),
and engines/ imports nothing from router/.
"""

from tokenization.model import OFF_LOOP_CHARS, ModelTokenizer, TokenizerError, prompt_chars

__all__ = ["OFF_LOOP_CHARS", "ModelTokenizer", "TokenizerError", "prompt_chars"]
