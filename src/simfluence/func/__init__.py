"""Primitives shared by methods: per-example gradients and their products, exact metagradients."""

from simfluence.func.gradients import gradient_products, per_example_gradients, trainable_params
from simfluence.func.metagradients import MetagradientResult, metagradients

__all__ = ["MetagradientResult", "gradient_products", "metagradients", "per_example_gradients", "trainable_params"]
