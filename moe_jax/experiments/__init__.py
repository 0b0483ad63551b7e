"""Experiments built on the pipeline: `num_experts` (the seed paper's third claim)."""
