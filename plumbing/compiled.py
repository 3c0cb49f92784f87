"""plumbing/compiled.py: torch.compile for the DiT, with the recompile limit set so that every
layer-drop budget compiles instead of silently falling back to eager."""
import torch


def compile_network(denoiser, mode=None, backend="inductor"):
    """torch.compile the DiT's forward inside `denoiser`, in place (same state_dict keys; the text
    encoder stays eager); returns it. Each list of blocks (a budget), block read by the
    discriminator and new batch size recompiles, so the recompile limit covers every budget; past
    the limit torch would quietly run the network eager, so hitting it raises instead.
    mode: torch.compile's ("reduce-overhead" for batch-1 sampling on CUDA); backend: its backend
    ("eager" traces without code generation: the tests' check of the call patterns). Needs a C++
    compiler on CPU (and Triton on CUDA) for the default backend."""
    depth = len(denoiser.net.blocks)
    # the names before torch 2.7: cache_size_limit, fail_on_cache_limit_hit
    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    # every budget (depth + 1 lists of blocks) in up to three variants (batch size static, then
    # dynamic; no-grad), plus a distillation stage's fixed patterns (grad on / off, frozen or
    # trained weights, the discriminator's shorter pass): 11 graphs for Presto-LS at depth 8, 16
    # for sampling
    setattr(dynamo, limit, max(getattr(dynamo, limit), 3 * (depth + 1) + 8))
    for fail in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):  # whichever torch has
        if hasattr(dynamo, fail):
            setattr(dynamo, fail, True)
            break
    denoiser.net.compile(mode=mode, backend=backend)
    return denoiser
