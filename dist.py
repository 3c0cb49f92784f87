"""dist.py: data parallelism under torchrun, nanoGPT-style: a few `if DIST.world > 1` lines, no framework.

Not a paper idea: the plumbing that lets every stage of train.py run on N processes unchanged, kept
out of train.py so that file stays about the training loops.

  torchrun --nproc_per_node=N train.py --stage S ...   (CPU: gloo; CUDA: nccl, one GPU per process)

`*.batch_size` is always the *global* batch. It is cut into chunks of `train.micro_batch` clips
(0: one chunk per process); process r takes chunks r, r+N, r+2N, ... and accumulates their
gradients, so changing N or the micro-batch keeps the optimisation the same. Each chunk draws
its noise with edm.BatchRNG, so a clip gets the same noise wherever it runs. Gradients are
averaged with one all-reduce per optimiser step (`average_gradients`), which is what
DistributedDataParallel does in buckets during backward. We do it by hand, after backward: Presto-S
calls the fake network several times per step and freezes it on generator turns, and an explicit
all-reduce of exactly the parameters an optimiser owns cannot hit DDP's unused-parameter errors
or hang. Only rank 0 writes logs and checkpoints; every rank reads a checkpoint to resume.
"""
import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"        # where collectives run: this process's GPU under NCCL, else cpu

    @property
    def main(self):
        return self.rank == 0


DIST = Dist()          # this process's place in the job; a plain `python train.py` is a world of one


def init_distributed():
    """Join the process group that torchrun describes in the environment (no-op without torchrun).
    DIST is filled in place, so `from dist import DIST` anywhere sees this process's place."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        cuda = torch.cuda.is_available()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        DIST.rank, DIST.world, DIST.local_rank = int(os.environ["RANK"]), world, local
        DIST.device = f"cuda:{local}" if cuda else "cpu"
        if cuda:
            torch.cuda.set_device(DIST.local_rank)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return DIST


def average_gradients(params):
    """All-reduce the mean gradient over processes, in one flat buffer.

    A parameter without a gradient on some process (a block no clip of its micro-batch ran)
    counts as a zero there; one without a gradient anywhere stays without (as it would in a
    single process), so AdamW skips it on every rank alike.
    """
    params = [p for p in params if p.requires_grad]
    if DIST.world == 1 or not params:
        return
    dev = params[0].device
    flat = torch.cat([*(p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), device=dev)
                        for p in params),
                      torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev)])
    torch.distributed.all_reduce(flat)
    used, offset = flat[-len(params):], 0
    for i, p in enumerate(params):
        grad = flat[offset:offset + p.numel()].view_as(p) / DIST.world
        if p.grad is not None:
            p.grad.copy_(grad)
        elif used[i] > 0:       # a host sync, only for a parameter this process did not use
            p.grad = grad.to(p.dtype)
        offset += p.numel()


def global_mean(values):
    """{name: tensor} -> {name: float}: each value averaged over processes (one host sync: call
    it at log steps only)."""
    if not values:
        return {}
    keys = sorted(values)
    dev = DIST.device if DIST.world > 1 else "cpu"      # NCCL reduces CUDA tensors only
    stacked = torch.stack([values[k].detach().float().reshape(()).to(dev) for k in keys])
    if DIST.world > 1:
        torch.distributed.all_reduce(stacked)
        stacked = stacked / DIST.world
    return dict(zip(keys, stacked.tolist()))


class _GatherRows(torch.autograd.Function):
    """Concatenate every process's rows (forward); give each process the summed gradient of its
    own rows (backward), so a loss over the gathered batch trains every process's encoder."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(DIST.world)]
        torch.distributed.all_gather(parts, x.contiguous())
        ctx.n = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        return grad[DIST.rank * ctx.n:(DIST.rank + 1) * ctx.n]


def gather_rows(x):
    """The global batch of embeddings for a loss that needs all of it (the contrastive loss)."""
    return x if DIST.world == 1 else _GatherRows.apply(x)


def barrier():
    if DIST.world > 1:
        torch.distributed.barrier()
