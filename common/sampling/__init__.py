"""KV cache and batched sampler for the shared decoder LMs (see kv_cache.py and sampler.py)."""
