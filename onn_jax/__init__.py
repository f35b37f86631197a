"""onn-jax: Tiny-ONN (Native Sparse Attention + DynMoE) trained on ARC in JAX/Flax."""

__version__ = "0.1.0"
