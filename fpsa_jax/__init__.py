"""fpsa-jax: FPSAttention for Wan2.1 in JAX."""
