"""icm-jax: Internal Coherence Maximization in JAX."""
