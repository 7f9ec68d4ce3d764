"""Primitives shared by methods: per-example gradients and their products, example features, exact metagradients."""

from simfluence.func.features import gradient_sketch, task_features
from simfluence.func.gradients import gradient_products, per_example_gradients, trainable_params
from simfluence.func.metagradients import MetagradientResult, metagradients

__all__ = ["MetagradientResult", "gradient_products", "gradient_sketch", "metagradients", "per_example_gradients",
           "task_features", "trainable_params"]
