"""Timing that needs no trained model: latency at a preset's output size on random weights."""
