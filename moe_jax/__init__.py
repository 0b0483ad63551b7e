"""moe_jax: mixture-of-experts semantic segmentation with uncertainty, in JAX/Flax."""
