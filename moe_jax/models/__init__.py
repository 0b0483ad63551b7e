"""Flax NNX modules: ResNet backbone, DeepLabv3+ expert, gates, and the stacked mixture."""
