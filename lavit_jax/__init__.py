"""lavit-jax: LaVIT and Video-LaVIT in JAX/Flax."""

__version__ = "0.1.0"
