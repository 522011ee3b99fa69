"""dpo_jax: Direct Preference Optimization of Hugging Face causal LMs in functional JAX/Flax."""

__version__ = "0.1.0"
