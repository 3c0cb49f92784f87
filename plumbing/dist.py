"""plumbing/dist.py: data parallelism under torchrun, nanoGPT-style: a few `if DIST.world > 1`
lines, no framework; each process's batches made ahead by DataLoader workers (`Feed`); whether a
step fits the device (`check_memory`).

Not a paper idea: the plumbing that lets every stage of train.py run on N processes, and keep a
GPU fed, unchanged, kept out of train.py so that file stays about the training loops.

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
import time
from dataclasses import dataclass

import torch

import data
import dit


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"        # where collectives run: this process's GPU under NCCL, else cpu

    @property
    def main(self):
        return self.rank == 0


DIST = Dist()      # this process's place in the job; a plain `python train.py` is a world of one


def init_distributed():
    """Join the process group that torchrun describes in the environment (no-op without torchrun).
    DIST is filled in place, so `from plumbing.dist import DIST` anywhere sees this process's
    place."""
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
    flat = torch.cat([*(p.grad.flatten() if p.grad is not None
                        else torch.zeros(p.numel(), device=dev) for p in params),
                      torch.tensor([p.grad is not None for p in params], dtype=torch.float32,
                                   device=dev)])
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


# ----------------------------------------------------------------------------------------------
# Each process's chunks of every step, made ahead of the loop

def micro_split(batch_size, micro_batch):
    """(clips per chunk, number of chunks) of a global batch; a clear error if it doesn't divide."""
    per_rank, rest = divmod(batch_size, DIST.world)
    m = min(micro_batch, per_rank) if micro_batch else per_rank   # at most the process's share
    if rest or m <= 0 or per_rank % m:
        raise ValueError(f"global batch {batch_size} does not split into {DIST.world} processes x "
                         f"micro-batches of {m} clips: set a batch size divisible by both "
                         f"(or train.micro_batch)")
    return m, batch_size // m


class _Chunks(torch.utils.data.Dataset):
    """Item k of a Feed's (step, chunk) list: that chunk's (waves, captions, labels)."""

    def __init__(self, keys, ds, m, chunks, seed, stream):
        self.keys, self.ds, self.m, self.chunks, self.seed, self.stream = (
            keys, ds, m, chunks, seed, stream)

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, k):
        step, c = self.keys[k]
        return data.get_batch(self.ds, step, self.m, self.seed, rank=c, world=self.chunks,
                              stream=self.stream)


def workers_for(train_cfg, device):
    """train.workers, or (-1, auto) enough to keep a GPU fed: the CPU cores this process has, less
    one for the training loop (at most 8); on a CPU, 0: workers would take the training's cores."""
    if train_cfg.workers >= 0:
        return train_cfg.workers
    if device.type != "cuda":
        return 0
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, torch.cuda.device_count()) - 1))


class Feed:
    """This process's micro-batches of steps start .. total-1, in order: feed(step) yields
    (waves, captions, labels, rows, weight) for each of its chunks of the step.

    Chunk c of a step holds positions [c*m, (c+1)*m) of the step's global batch, so no two
    processes share a clip and the chunks together are exactly the single-process batch
    (data.batch_indices); rows is that slice (its rows in edm.BatchRNG draws) and weight the
    chunk's share of this process's clips, the loss multiplier that makes accumulated gradients a
    mean (average_gradients then averages over processes). stream: data.batch_indices' stream.

    With workers > 0, DataLoader worker processes make the chunks ahead of the loop (a few steps
    of prefetch; pinned memory on CUDA, so the copy to the device can be non-blocking). A chunk is
    a pure function of (step, chunk), so a run gives the same numbers with any number of workers
    and resumes exactly. wait: seconds the loop has spent waiting for data (take_wait resets it).
    """

    def __init__(self, ds, batch_size, cfg, start, total, device, stream=0, micro_batch=None,
                 share=1.0):
        micro_batch = cfg.train.micro_batch if micro_batch is None else micro_batch
        self.m, self.chunks = micro_split(batch_size, micro_batch)
        mine = range(DIST.rank, self.chunks, DIST.world)
        self.keys = [(step, c) for step in range(start, total) for c in mine]
        items = _Chunks(self.keys, ds, self.m, self.chunks, cfg.data.seed, stream)
        workers = workers_for(cfg.train, device)
        workers = max(1, int(workers * share)) if workers else 0   # share: of workers, for 2 feeds
        self.items, self.pos, self.wait, self.it = items, 0, 0.0, None
        if workers > 0 and self.keys:   # 2 chunks in flight per worker (shared memory: /dev/shm)
            self.it = iter(torch.utils.data.DataLoader(
                items, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                prefetch_factor=2, persistent_workers=False))

    def __call__(self, step):
        for c in range(DIST.rank, self.chunks, DIST.world):
            if self.keys[self.pos] != (step, c):
                raise RuntimeError(f"Feed asked for step {step} chunk {c}, "
                                   f"expected {self.keys[self.pos]}")
            t = time.perf_counter()
            waves, captions, labels = next(self.it) if self.it is not None else self.items[self.pos]
            self.wait += time.perf_counter() - t
            self.pos += 1
            yield (waves, captions, labels, slice(c * self.m, (c + 1) * self.m),
                   DIST.world / self.chunks)

    def take_wait(self):
        wait, self.wait = self.wait, 0.0
        return wait



# ----------------------------------------------------------------------------------------------
# Will a step fit the device?

def memory_need(denoiser, rep, cfg, device, autocast, graphs=1.0, weight_bytes=20):
    """(bytes per clip, fixed bytes) of a training step of `denoiser`, measured, not modelled:
    autograd's saved tensors (saved-tensor hooks) of a forward at batch 1 and at batch 2 under the
    run's autocast; their difference is the activation memory per clip, and what does not grow with
    the batch (e.g. bf16 copies of the weights) is fixed, with the float32 weights, gradients,
    AdamW moments and EMA copy (weight_bytes: 4 + 4 + 8 + 4 per parameter). graphs: how many such
    forwards a step keeps for backward at once (a distillation step: the generator's, the fake
    score's and the discriminator's partial passes). Temporaries are not counted."""
    C, T = rep.latent_channels, rep.n_frames(cfg.data.seconds)
    weights = {p.data_ptr() for p in denoiser.parameters()}    # saved by reference: counted below
    saved = []
    for b in (1, 2):
        total = [0]

        def pack(t, total=total):
            total[0] += 0 if t.data_ptr() in weights else t.numel() * t.element_size()
            return t
        x = torch.zeros(b, C, T, device=device)
        ids = torch.zeros(b, cfg.data.max_text_len, dtype=torch.long, device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            denoiser(x, torch.ones(b, device=device), denoiser.net.encode_text(ids))
        saved.append(total[0])
    params = sum(p.numel() for p in denoiser.parameters())
    return (graphs * (saved[1] - saved[0]),
            graphs * (2 * saved[0] - saved[1]) + weight_bytes * params)


def device_memory(device):
    """Bytes of memory the device has for a run (CUDA), or None (a CPU: not checked)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def check_memory(denoiser, rep, cfg, device, autocast, micro_size, batch_size=None, **need):
    """The estimate, as a line to print; on a device too small, a one-line error naming a
    micro-batch that fits (batch_size: the stage's global batch, default train.batch_size;
    need: memory_need's graphs and weight_bytes)."""
    per_clip, fixed = memory_need(denoiser, rep, cfg, device, autocast, **need)
    need, have = fixed + micro_size * per_clip, device_memory(device)
    line = (f"memory: ~{per_clip / 2**30:.3f} GiB of activations per clip; "
            f"~{need / 2**30:.2f} GiB at micro-batch {micro_size} "
            "(weights, gradients, AdamW and EMA included)"
            + (f"; the device has {have / 2**30:.1f} GiB" if have else ""))
    if have and need > 0.9 * have:
        share = (batch_size or cfg.train.batch_size) // DIST.world  # a micro-batch divides this
        fits = max([m for m in range(1, share + 1)
                    if share % m == 0 and fixed + m * per_clip <= 0.9 * have],
                   default=0)
        raise ValueError(f"a micro-batch of {micro_size} clips needs ~{need / 2**30:.1f} GiB, "
                         f"more than 90% of the device's {have / 2**30:.1f} GiB: set "
                         f"train.micro_batch={fits} (gradient accumulation keeps the batch)"
                         if fits > 0 else
                         f"one clip needs ~{(fixed + per_clip) / 2**30:.1f} GiB: the model does "
                         "not fit")
    return line


# Dense bf16 peak of known accelerators, FLOP/s (vendor data sheets, SXM parts)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class Speed:
    """Clips per second since the last report and, on CUDA, the model FLOPs utilisation: the
    DiT's analytic training FLOPs per clip (3x the forward pass of dit.flops_per_sample: backward
    costs twice the forward) times clips per second, over the peak of the processes' GPUs."""

    def __init__(self, cfg, rep, device, feed=None):
        self.feed = feed  # its waits give data_wait: the share of the time spent waiting for data
        self.flops = 3 * dit.flops_per_sample(cfg.model, rep.n_frames(cfg.data.seconds),
                                              cfg.data.max_text_len)
        peak = cfg.train.peak_tflops * 1e12
        if not peak and device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            peak = next((v for k, v in PEAK_BF16.items() if k in name), 0.0)
        self.peak = peak * DIST.world if device.type == "cuda" else 0.0
        self.t0, self.n = time.time(), 0

    def count(self, clips):
        self.n += clips

    def report(self):
        elapsed = max(time.time() - self.t0, 1e-9)
        rate = self.n / elapsed
        self.t0, self.n = time.time(), 0
        return {"clips_per_s": rate,
                **({"mfu": rate * self.flops / self.peak} if self.peak else {}),
                **({"data_wait": self.feed.take_wait() / elapsed} if self.feed is not None else {})}
