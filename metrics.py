"""metrics.py: the paper's quality metrics, as pure functions of embeddings.

The paper reports FAD, MMD and CLAP score (its evaluation, Section 4), plus diversity. Each
function here takes embeddings (numpy or torch arrays, one row per clip) and returns numbers: no
models, no I/O, so they are tested against closed forms and can score any embedder's output.
evaluate.py decides what is compared with what.

Read first: `frechet_distance` (FAD) and `fad_inf` (FAD with its small-sample bias extrapolated
away), then `mmd`, `clap_score` and `diversity`; `mean_and_se`, `paired_difference` and
`rank_agreement` turn per-item values into error bars and orderings.
"""
import numpy as np
import torch



def _f64(x):
    return np.asarray(x.detach().cpu() if torch.is_tensor(x) else x, dtype=np.float64)


def _sqrt_psd(S):
    """Symmetric PSD square root from an eigendecomposition; tiny negative eigenvalues -> 0."""
    w, V = np.linalg.eigh(S)
    return (V * np.sqrt(np.clip(w, 0, None))) @ V.T


def frechet_distance(x, y):
    """FAD / FID between Gaussian fits of x (n, d) and y (m, d), in float64.

    FD = |mu_x - mu_y|^2 + tr(S_x) + tr(S_y) - 2 tr((S_x^1/2 S_y S_x^1/2)^1/2).
    The last trace equals tr((S_x S_y)^1/2), but S_x S_y is not symmetric and a general sqrtm can
    return complex values; S_x^1/2 S_y S_x^1/2 is symmetric PSD, so both square roots come from
    `eigh` with negative round-off eigenvalues clipped to 0. That stays finite and real when the
    covariances are rank deficient (fewer clips than dimensions), which is the usual case here.
    Only same-n comparisons are fair: the estimate is biased upward for small n.
    """
    x, y = _f64(x), _f64(y)
    if min(len(x), len(y)) < 2:
        raise ValueError("a Gaussian fit needs at least 2 embeddings a side, "
                         f"got {len(x)} and {len(y)}")
    mu_x, mu_y = x.mean(0), y.mean(0)
    S_x, S_y = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    r = _sqrt_psd(S_x)
    M = r @ S_y @ r
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((M + M.T) / 2), 0, None)).sum()
    fd = ((mu_x - mu_y) ** 2).sum() + np.trace(S_x) + np.trace(S_y) - 2 * tr_sqrt
    return max(float(fd), 0.0)  # FD >= 0; a negative value is only round-off


def fad_inf(x, y, draws=4, seed=0):
    """FAD extrapolated to infinitely many clips (Chong & Forsyth 2020, "FID-infinity").

    FAD of random subsets of N clips of x and N clips of y (without replacement), at six sizes N
    from n/4 to n = min(len(x), len(y)), `draws` subsets each, fitted by least squares as
    FAD(N) = FAD_inf + slope / N: the estimate's upward bias falls as 1/N, so the intercept is the
    FAD of infinitely many clips. Returns (FAD_inf, slope, R^2 of the fit). At sample sizes below
    the embedding dimension it is an extrapolation from few points, hence the R^2 beside it."""
    x, y = _f64(x), _f64(y)
    n = min(len(x), len(y))
    rng = np.random.default_rng(seed)
    sizes = sorted({max(2, round(n * f)) for f in np.linspace(0.25, 1.0, 6)})
    if len(sizes) < 3:                     # too few clips for a fit that means anything
        return None, None, None
    pick = lambda a, N: a[rng.choice(len(a), N, replace=False)]
    inv = np.repeat([1.0 / N for N in sizes], draws)
    fad = np.array([frechet_distance(pick(x, N), pick(y, N)) for N in sizes for _ in range(draws)])
    A = np.stack([np.ones_like(inv), inv], 1)
    (a, b), *_ = np.linalg.lstsq(A, fad, rcond=None)
    r2 = 1 - ((fad - A @ (a, b)) ** 2).sum() / max(((fad - fad.mean()) ** 2).sum(), 1e-30)
    return float(a), float(b), float(r2)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def mmd(x, y, sigma=10.0):
    """CMMD-style MMD^2 x 1000: biased (V-statistic, diagonals kept) with the RBF kernel
    k(a, b) = exp(-|a - b|^2 / (2 sigma^2)) on L2-normalised rows of x (n, d) and y (m, d)."""
    x, y = _unit(_f64(x)), _unit(_f64(y))

    def k(a, b):  # (n, m) kernel matrix via |a|^2 + |b|^2 - 2 a.b
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
        return np.exp(-np.clip(d2, 0, None) / (2 * sigma ** 2))
    return float(1000 * (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()))


def clap_score(audio, text, per_clip=False):
    """Mean cosine similarity between matching rows of audio (n, d) and text (n, d) embeddings
    (per_clip: the (n,) array of each clip's own similarity)."""
    by_clip = (_unit(_f64(audio)) * _unit(_f64(text))).sum(1)
    return by_clip if per_clip else float(by_clip.mean())


def diversity(emb, per_prompt=False):
    """emb (P prompts, S seeds, d) -> mean pairwise L2 distance between seeds of one prompt,
    averaged over prompts (per_prompt: the (P,) array of each prompt's own mean)."""
    e = _unit(_f64(emb))
    d = np.linalg.norm(e[:, :, None] - e[:, None, :], axis=-1)  # (P, S, S)
    S = e.shape[1]
    by_prompt = d.sum((1, 2)) / (S * (S - 1))
    return by_prompt if per_prompt else float(by_prompt.mean())


def mean_and_se(values):
    """Mean and standard error of the mean (None with fewer than 2 values) of a 1-D sample."""
    v = _f64(values)
    return float(v.mean()), (float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None)


def paired_difference(rows, a, b, key):
    """Row a's metric minus row b's, paired item by item: rows hold per-item values under key
    (e.g. "diversity_by_prompt", "clap_score_by_clip"), computed on the same prompts and seeds.
    Returns (mean difference, its standard error, items), or None if either row lacks them."""
    by_name = {r["name"]: r.get(key) for r in rows}
    if not by_name.get(a) or not by_name.get(b):
        return None
    diff = _f64(by_name[a]) - _f64(by_name[b])
    return (*mean_and_se(diff), len(diff))


def rank_agreement(rows, a, b):
    """How two metrics (e.g. two judges' FAD) order the rows: Spearman's rank correlation and every
    pair of rows they order differently. rows: dicts with both keys (the generated rows)."""
    rows = [r for r in rows if r.get(a) is not None and r.get(b) is not None]
    names, x, y = [r["name"] for r in rows], [r[a] for r in rows], [r[b] for r in rows]
    ranks = lambda v: np.argsort(np.argsort(v)).astype(float)
    rho = float(np.corrcoef(ranks(x), ranks(y))[0, 1]) if len(rows) > 2 else None
    flips = [(names[i], names[j]) for i in range(len(rows)) for j in range(i + 1, len(rows))
             if (x[i] - x[j]) * (y[i] - y[j]) < 0]
    return rho, flips
