"""torchrun data parallelism and the batch feed (dist): the plumbing train.py's loops lean on."""
