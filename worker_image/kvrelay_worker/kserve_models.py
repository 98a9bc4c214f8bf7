"""The KServe v2 model names a worker exposes (wire contract section 2): one definition for both ends.

The router calls these models and the worker server serves them; neither imports the other.
"""

PREFILL_MODEL = "kvrelay_prefill"  # token ids + sampling -> first token + KV handle
DECODE_MODEL = "kvrelay_decode"  # KV handle + first token -> a decoupled stream of tokens
