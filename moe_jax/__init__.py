"""moe_jax: mixture-of-experts semantic segmentation with uncertainty, in JAX/Flax.

`moe_jax.restore(workdir)` gives a predictor of a trained run (see `moe_jax.predict`);
it is imported on first use, so `import moe_jax.<module>` stays light.
"""


def __getattr__(name: str):
  if name == "restore":
    from moe_jax.predict import restore
    return restore
  raise AttributeError(f"module 'moe_jax' has no attribute {name!r}")
