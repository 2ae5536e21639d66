"""jaxddp: data-parallel training of vision models in JAX/Flax."""
