"""What the scripts lean on and a student can skip: torchrun data parallelism and the batch feed
(dist), the loops' bookkeeping (loop), checkpoint files (checkpoints), torch.compile (compiled), the
config fields' declared ranges (ranges) and which --set values a stage or a --resume takes
(overrides)."""
