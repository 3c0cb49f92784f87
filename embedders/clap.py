"""embedders/clap.py: the evaluation embedder, a miniature CLAP trained by this project.

The paper scores its models with FAD, MMD and CLAP score on the embeddings of a pretrained
audio-text model (CLAP). Pretrained CLAP cannot be downloaded here, so `--stage clap` trains a
small contrastive audio-text model on the training split and freezes it; every metric in
evaluate.py only sees its embeddings, so a user with real CLAP passes their own `embed_fn` there.

Read first: `ClapModel.embed_audio` and `embed_text` (what the metrics see), then
`contrastive_loss` (symmetric InfoNCE, as CLIP/CLAP train) and the attribute heads, which turn
the synthetic captions' ground truth into a prompt-adherence score.
"""
import math
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F

import dit

@dataclass
class ClapConfig:
    dim: Annotated[int, ">= 1"] = 128  # joint embedding size d (what FAD / MMD / CLAP score see)
    width: Annotated[int, ">= 1"] = 128  # audio tower channels and text tower width
    # the audio tower's dilated residual conv blocks (1, 2, 4, ...)
    audio_depth: Annotated[int, ">= 1"] = 4
    text_depth: Annotated[int, ">= 1"] = 1  # transformer layers in the text tower
    heads: Annotated[int, ">= 1"] = 4  # text tower attention heads
    # weight of the attribute cross-entropy (labelled data sets only)
    attr_weight: Annotated[float, ">= 0"] = 1.0
    # augmentation: random gain in [-gain_db, 0] dB per training clip
    gain_db: Annotated[float, ">= 0"] = 6.0
    steps: Annotated[int, ">= 1"] = 1000  # optimiser steps
    batch_size: Annotated[int, ">= 2"] = 32  # clips per step (also the InfoNCE negatives)
    lr: Annotated[float, "> 0"] = 1e-3  # AdamW peak learning rate (train.lr_at schedule)
    warmup: Annotated[int, ">= 0"] = 50
    lr_decay: Annotated[str, "cosine|constant"] = "cosine"
    min_lr_frac: Annotated[float, "in [0, 1]"] = 0.1
    weight_decay: Annotated[float, ">= 0"] = 0.01
    # steps between held-out (val split) retrieval / attribute numbers
    eval_every: Annotated[int, ">= 0"] = 250
    # val clips for those numbers (R@1 among this many candidates)
    val_clips: Annotated[int, ">= 2"] = 64
    seed: Annotated[int, "in [0, 9e18]"] = 0  # model init and augmentation draws



def attribute_targets(labels, attributes):
    """List of label dicts -> {attribute: LongTensor (B,)} of class indices in `attributes`
    ({attribute: its classes}, data.attributes: synth.ATTRIBUTES or corpus.ATTRIBUTES)."""
    return {k: torch.tensor([classes.index(l[k]) for l in labels])
            for k, classes in attributes.items()}


class ClapModel(nn.Module):
    """Audio tower (conv over normalised log|STFT| frames, mean-pooled) and text tower
    (dit.TextEncoder, pooled), both projected to d and L2-normalised; optional attribute heads."""

    def __init__(self, clap_cfg, rep, tok, max_len, attributes):
        super().__init__()
        self.rep, self.tok, self.max_len = rep, tok, max_len  # features and words, not parameters
        W = clap_cfg.width
        self.stem = nn.Sequential(  # two stride-2 convs: ~16 tokens per second at 8 kHz / hop 128
            nn.Conv1d(rep.latent_channels, W, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv1d(W, W, 5, stride=2, padding=2))
        self.blocks = nn.ModuleList(  # dilated residual blocks: a receptive field of a few beats
            nn.Sequential(nn.GroupNorm(1, W), nn.GELU(),
                          nn.Conv1d(W, W, 3, padding=2**i, dilation=2**i),
                          nn.GELU(), nn.Conv1d(W, W, 1)) for i in range(clap_cfg.audio_depth))
        # tempo is a period, which mean-pooled local features hardly see: add the autocorrelation
        # of the onset envelope (positive spectral flux) over lags up to 1.2 s (below 50 bpm)
        self.lags = max(2, int(1.2 * rep.frames_per_second))
        self.rhythm = nn.Linear(self.lags, W)
        self.audio_proj = nn.Sequential(nn.LayerNorm(W), nn.Linear(W, clap_cfg.dim))
        self.text = dit.TextEncoder(tok.vocab_size, W, clap_cfg.text_depth, clap_cfg.heads, max_len)
        self.text_proj = nn.Linear(W, clap_cfg.dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's first temperature
        self.attributes = dict(attributes or {})  # {attribute: classes}: one linear head each
        self.heads = nn.ModuleDict({k: nn.Linear(clap_cfg.dim, len(v))
                                    for k, v in self.attributes.items()})

    def embed_audio(self, waves):
        """waves (B, ch, N) at cfg.data.sample_rate -> unit embeddings (B, d)."""
        x = self.rep.encode(waves.to(self.log_scale.device))              # (B, C, T)
        h = self.stem(x)                                                   # (B, W, T/4)
        for block in self.blocks:
            h = h + block(h)
        return F.normalize(self.audio_proj(h.mean(-1) + self.rhythm(self.onset_autocorr(x))),
                           dim=-1)

    def onset_autocorr(self, x):
        """x (B, C, T) -> normalised autocorrelation of the onset envelope at lags 1..L (B, L)."""
        flux = F.relu(x.diff(dim=-1)).mean(1)                              # (B, T-1)
        flux = flux - flux.mean(-1, keepdim=True)
        n = max(flux.shape[-1], self.lags + 1)
        spec = torch.fft.rfft(flux, 2 * n)                             # zero-padded: no wrap-around
        ac = torch.fft.irfft(spec.abs() ** 2, 2 * n)[:, :self.lags + 1]  # (B, L+1)
        return ac[:, 1:] / ac[:, :1].clamp_min(1e-6)

    def embed_text(self, captions):
        """captions (B strings) -> unit embeddings (B, d)."""
        ids = self.tok.encode(captions, self.max_len).to(self.log_scale.device)
        return F.normalize(self.text_proj(self.text(ids)[2]), dim=-1)

    def attribute_logits(self, emb):
        return {k: head(emb) for k, head in self.heads.items()}

    def predict_attributes(self, emb):
        """emb (B, d) -> {attribute: predicted class index (B,)}."""
        return {k: v.argmax(-1) for k, v in self.attribute_logits(emb).items()}


def contrastive_loss(audio, text, log_scale):
    """Symmetric InfoNCE over a batch of matching (audio, text) unit embeddings; learned
    temperature."""
    logits = log_scale.clamp(max=math.log(100)).exp() * text @ audio.T  # (B captions, B clips)
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def attribute_loss(logits, targets):
    """Mean cross-entropy over the attribute heads."""
    return (sum(F.cross_entropy(logits[k], targets[k].to(logits[k].device)) for k in logits)
            / len(logits))


# ----------------------------------------------------------------------------------------------
# The embedder's own quality: does it find a clip from its caption, does it hear the attributes?

def retrieval_r1(audio, text):
    """Text -> audio recall@1: share of captions whose own clip is the nearest of all n clips."""
    audio, text = torch.as_tensor(audio).double(), torch.as_tensor(text).double()
    sim = F.normalize(text, dim=-1) @ F.normalize(audio, dim=-1).T          # (n captions, n clips)
    return float((sim.argmax(1) == torch.arange(len(sim))).double().mean())


def attribute_accuracy(pred, target):
    """{attribute: accuracy} of predicted vs target class indices, plus their mean."""
    acc = {k: float((torch.as_tensor(pred[k]).cpu()
                     == torch.as_tensor(target[k]).cpu()).double().mean())
           for k in target}
    return {**acc, "mean": sum(acc.values()) / len(acc)}


@torch.no_grad()
def embedder_scores(model, val):
    """Held-out (val split) text -> audio R@1 among the val clips, and attribute accuracies."""
    waves, captions, labels = val
    model.eval()
    audio = model.embed_audio(waves)
    out = {"val_r1": retrieval_r1(audio, model.embed_text(captions))}
    if model.heads:
        out["val_attributes"] = attribute_accuracy(model.predict_attributes(audio),
                                                   attribute_targets(labels, model.attributes))
    model.train()
    return out
