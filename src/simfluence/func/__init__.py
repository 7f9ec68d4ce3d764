"""Primitives shared by methods: per-example gradients and their products."""

from simfluence.func.gradients import gradient_products, per_example_gradients, trainable_params

__all__ = ["gradient_products", "per_example_gradients", "trainable_params"]
