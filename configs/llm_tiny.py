"""A tiny LLaMA config (HF field names) for tests, CPU benchmarks and smoke runs.

Vocabulary laid out as LaVIT's: 32000 text ids, [IMG] = 32000, [/IMG] = 32001, then 64 visual codes.
Usage: ``from configs.llm_tiny import get_config; cfg = get_config()`` (a frozen ``ml_collections.FrozenConfigDict``).
"""

from lavit_jax.models.llama import llama_config


def get_config():
    return llama_config(
        dict(
            vocab_size=32002 + 64,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            rope_scaling=None,
            tie_word_embeddings=False,
            max_position_embeddings=512,
        )
    )
