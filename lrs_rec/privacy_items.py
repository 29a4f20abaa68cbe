"""One-hot private U-step, per item (private ALS with a population Gram): which samples of a user
enter, how one user's whole contribution is bounded, and the per-item posterior of U_i. Pure numpy.

Released per U-step (add/remove one user, one-hot items distinct per user):

    V_i = Σ_{u rated i, selected} s_u·t_ui·ŵ_u,   t_ui = clip(y_ui, A2) − clip(⟨x, b_u⟩, A3)
    s_u = min(1, C / ‖t_u‖₂)                         (the user's selected residual vector, ≤ m samples)

so one user's contribution to V (an n_items × r matrix with ≤ m non-zero rows) has Frobenius norm
s_u·‖t_u‖₂·‖ŵ_u‖ ≤ min(√m·(A2 + A3), C)·A_w (:func:`item_rows_sensitivity`). Which ≤ m samples of a
user are selected is decided from public values (a released popularity score per item, e.g. the
noisy item-bias counts Ñ_i) and the user's own ratings only (:func:`select_popular_per_user`), so
removing a user changes only that user's own rows.

The per-item Gram Σ_u s_u ŵ_uŵ_uᵀ is replaced by a_i·M̂ (a_i: released count of the selected samples
of item i, M̂: released per-sample second moment Σ_u s_u n_u ŵ_uŵ_uᵀ / Σ a): post-processing.
:func:`wiener_item_rows` then solves each row for the posterior mean of U_i under a public prior
N(0, u0² I) with DP noise of constant variance σ_V² on every entry of V_i plus the sampling noise:
in the eigenbasis (λ_k) of M̂, with g = a_i λ_k,

    U_ik = g·v_ik / (g·(g + ρ0) + σ_V²/u0²),    ρ0 = σ_e²/u0² (the non-private ridge)

— the DP noise does not grow with a_i, so the shrinkage it needs falls as 1/a_i (a ridge of σ_V²/u0²
in Gram units, the same for every item, over-shrinks popular items by a factor a_i·λ).
"""

from __future__ import annotations

import math

import numpy as np

from lrs_rec._types import FloatArray, IntArray
from lrs_rec.privacy import clip_rows, clip_scalar, first_per_user


def select_popular_per_user(
    users: IntArray,
    items: IntArray,
    popularity: FloatArray,
    m: int,
    rng: np.random.Generator | None,
    *,
    min_popularity: float = -np.inf,
    keys: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean mask keeping, for each user, at most ``m`` samples: those on the items with the largest
    ``popularity`` (a public, released per-item score), ties broken at random, items with popularity
    below ``min_popularity`` never kept. Depends only on the public score, the random tie-breaks and
    the user's own samples. The tie-breaks: ``keys`` per sample (keyed draws,
    :func:`lrs_rec.privacy.selection_keys`: the same on any partition of the users, what private
    training uses), else one ``rng`` draw per sample."""
    users = np.asarray(users, dtype=np.int64)
    pop = np.asarray(popularity, dtype=np.float64)[np.asarray(items, dtype=np.int64)]
    if keys is not None:
        jitter: np.ndarray = np.asarray(keys, dtype=np.uint64)
    elif rng is not None:
        jitter = rng.random(users.size)
    else:
        raise ValueError("select_popular_per_user needs keys or an rng for its tie-breaks")
    # sort by user, then by descending popularity, then by the random jitter
    keep = first_per_user(users, np.lexsort((jitter, -pop, users)), m)
    keep &= pop >= min_popularity
    return keep


def user_norm_weights(users: IntArray, t: FloatArray, n_users: int, bound: float) -> FloatArray:
    """s_u = min(1, C/‖t_u‖₂) per user (‖t_u‖ over the user's samples in ``t``)."""
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"user norm bound must be positive, got {bound!r}")
    norms = np.sqrt(np.bincount(users, weights=t * t, minlength=n_users))
    s = np.ones(n_users)
    big = norms > bound
    s[big] = bound / norms[big]
    return s


def item_rows_sensitivity(
    *, m: int, A2: float, A3: float, A_w: float, user_norm: float | None, sparse: bool
) -> float:
    """L2 sensitivity of V (:func:`clipped_item_rows`): min(√m·(A2 + A3), C)·A_w (A3 only with a
    sparse part)."""
    per_user = math.sqrt(m) * (A2 + (A3 if sparse else 0.0))
    if user_norm is not None:
        per_user = min(per_user, user_norm)
    return per_user * A_w


def clipped_item_rows(
    items: IntArray,
    y: FloatArray,
    xb: FloatArray,
    users: IntArray,
    W: FloatArray,
    n_items: int,
    *,
    A2: float,
    A3: float,
    A_w: float,
    user_norm: float | None,
    base_weights: FloatArray | None = None,
    sample_weights: FloatArray | None = None,
) -> tuple[FloatArray, FloatArray]:
    """(V, s): V_i = Σ_u s_u·t_ui·ŵ_u over the given samples (distinct items per user), and the
    per-user weights s_u = min(σ_u, C/‖t_u‖₂) (σ_u = ``base_weights``, default 1; the C term only with
    ``user_norm``). With ≤ m samples per user and σ ≡ 1, or with σ_u ≤ √(m/n_u) (any number of
    samples: :func:`activity_weights`), one user's V has norm ≤ min(√m·(A2 + A3), C)·A_w.
    ``sample_weights`` c_ui ∈ [0, 1] (:func:`item_weights`) multiply the clipped residuals,
    t_ui ← c_ui·t_ui, before the norm clip; with σ_u·‖c_u‖₂ ≤ √m the same bound holds."""
    from lrs_rec.engine.grouped import grouped_sum
    from lrs_rec.engine.steps import sample_budget

    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    t = clip_scalar(y, A2) - clip_scalar(xb, A3)
    if sample_weights is not None:
        c = np.asarray(sample_weights, np.float64)
        if c.shape != t.shape or np.any(c < 0) or np.any(c > 1):
            raise ValueError("sample_weights must be in [0, 1], one per sample")
        t = t * c
    n_users = W.shape[0]
    s = np.ones(n_users) if base_weights is None else np.asarray(base_weights, np.float64).copy()
    if user_norm is not None:
        s = np.minimum(s, user_norm_weights(users, t, n_users, user_norm))
    Wall = clip_rows(W, A_w) * s[:, None]
    r = Wall.shape[1]
    V = np.zeros((n_items, r))
    step = sample_budget(2 * r)
    for lo in range(0, users.size, step):
        sl = slice(lo, lo + step)
        V += grouped_sum(items[sl], n_items, Wall[users[sl]] * t[sl, None])
    return V, s


def activity_weights(
    users: IntArray, n_users: int, m: int, sample_weights: FloatArray | None = None
) -> FloatArray:
    """σ_u = min(1, √(m/n_u)): a user with n_u > m samples enters with all of them, down-weighted
    so that σ_u·√n_u ≤ √m (instead of a random subset of m). With per-sample weights c_ui ∈ [0, 1]
    (:func:`item_weights`) n_u is replaced by Σ_i c_ui², so that σ_u·‖c_u‖₂ ≤ √m."""
    users = np.asarray(users, dtype=np.int64)
    if sample_weights is None:
        n_u = np.bincount(users, minlength=n_users).astype(np.float64)
    else:
        c = np.asarray(sample_weights, np.float64)
        n_u = np.bincount(users, weights=c * c, minlength=n_users).astype(np.float64)
    return np.asarray(np.minimum(1.0, np.sqrt(m / np.maximum(n_u, 1e-300))), dtype=np.float64)


def item_weights(popularity: FloatArray, knee: float) -> FloatArray:
    """c_i = min(1, √(knee / p_i)) from a released (public) per-item popularity p_i: items with more
    (noisy, weighted) raters than ``knee`` enter a user's statistics down-weighted, so that one
    user's bounded contribution (norm ≤ C) goes mostly to the items that still need signal — the
    adaptive weights of Krichene et al. (2023) for skewed tasks. ``knee`` ≤ 0 or not finite: c ≡ 1.
    With c_i the weighted count c_i·p_i = √(knee·p_i) still grows with p_i."""
    p = np.asarray(popularity, np.float64)
    if not (math.isfinite(knee) and knee > 0):
        return np.ones(p.shape)
    out = np.ones(p.shape)
    big = p > knee
    out[big] = np.sqrt(knee / p[big])
    return out


def weighted_item_counts(
    items: IntArray,
    users: IntArray,
    weights: FloatArray,
    n_items: int,
    sample_weights: FloatArray | None = None,
) -> FloatArray:
    """a_i = Σ_{u rated i} σ_u·c_ui; one user's count vector has norm σ_u·‖c_u‖₂ ≤ σ_u·√n_u (≤ √m
    with :func:`activity_weights`, or with σ ≡ 1 and ≤ m samples per user). ``sample_weights``:
    c_ui ∈ [0, 1] (default 1)."""
    w = np.asarray(weights, np.float64)[np.asarray(users, np.int64)]
    if sample_weights is not None:
        w = w * np.asarray(sample_weights, np.float64)
    return np.asarray(np.bincount(np.asarray(items, np.int64), w, minlength=n_items), np.float64)


def weighted_second_moment(
    users: IntArray, W: FloatArray, weights: FloatArray, A_w: float, m: int
) -> FloatArray:
    """Σ_u ω_u·ŵ_uŵ_uᵀ (r × r), ω_u = min(n_u·s_u, m) (n_u: the user's samples here); one user's
    term has Frobenius norm ≤ m·A_w²."""
    users = np.asarray(users, dtype=np.int64)
    Wc = clip_rows(W, A_w)
    n_u = np.bincount(users, minlength=Wc.shape[0]).astype(np.float64)
    omega = np.minimum(n_u * np.asarray(weights, np.float64), float(m))
    return np.asarray((Wc * omega[:, None]).T @ Wc, dtype=np.float64)


def wiener_item_rows(
    V: FloatArray,
    counts: FloatArray,
    M: FloatArray,
    *,
    noise_var: float,
    prior_var: float,
    ridge: float,
) -> FloatArray:
    """Posterior mean of each row U_i given Ṽ_i ≈ a_i·M̂·U_i + N(0, noise_var·I) + sampling noise,
    prior U_i ~ N(0, prior_var·I): U_ik = g·v_ik / (g·(g + ridge) + noise_var/prior_var) in the
    eigenbasis of M̂ = PSD(M), g = max(a_i, 0)·λ_k (module docstring). Post-processing only."""
    if not (prior_var > 0 and noise_var >= 0 and ridge > 0):
        raise ValueError("need prior_var > 0, noise_var >= 0, ridge > 0")
    lam, Q = np.linalg.eigh(0.5 * (M + M.T))
    lam = np.maximum(lam, 0.0)
    a = np.maximum(np.asarray(counts, np.float64), 0.0)
    g = a[:, None] * lam[None, :]
    denom = g * (g + ridge) + noise_var / prior_var
    coef = np.divide((V @ Q) * g, denom, out=np.zeros_like(g), where=denom > 0)
    return np.asarray(coef @ Q.T, dtype=np.float64)


def wiener_item_rows_reference(
    V: FloatArray, counts: FloatArray, M: FloatArray, *, noise_var: float, prior_var: float,
    ridge: float,
) -> FloatArray:  # fmt: skip
    """Slow twin of :func:`wiener_item_rows`: one r×r solve per item of the posterior mean
    (G² + ridge·G + (noise_var/prior_var)·I)⁻¹ G v with G = a_i·PSD(M)."""
    lam, Q = np.linalg.eigh(0.5 * (M + M.T))
    Mp = (Q * np.maximum(lam, 0.0)) @ Q.T
    out = np.zeros_like(V, dtype=np.float64)
    r = M.shape[0]
    for i in range(V.shape[0]):
        G = max(float(counts[i]), 0.0) * Mp
        if not G.any():
            continue
        lhs = G @ G + ridge * G + (noise_var / prior_var) * np.eye(r)
        out[i] = np.linalg.lstsq(lhs, G @ V[i], rcond=None)[0]
    return out


def wiener_item_bias(
    S: FloatArray, N: FloatArray, *, noise_var: float, prior_var: float, ridge: float
) -> FloatArray:
    """Posterior mean of each item bias c_i given the released weighted residual sum
    S̃_i ≈ N_i·c_i + N(0, noise_var + ridge·prior_var·N_i) (DP noise plus sampling noise) and the
    released weighted count Ñ_i (plugged in as N_i = max(Ñ_i, 0)), prior c_i ~ N(0, prior_var):
    c_i = N·S̃ / (N·(N + ridge) + noise_var/prior_var) — the scalar case of
    :func:`wiener_item_rows`: the DP noise has the same variance for every item, so its shrinkage
    falls as 1/N² (the ratio S̃/(Ñ + λ + κ·σ_S) shrinks as 1/N). Without noise it is the ridge
    S̃/(N + ridge). Post-processing only."""
    if not (prior_var > 0 and noise_var >= 0 and ridge > 0):
        raise ValueError("need prior_var > 0, noise_var >= 0, ridge > 0")
    n = np.maximum(np.asarray(N, np.float64), 0.0)
    denom = n * (n + ridge) + noise_var / prior_var
    s = np.asarray(S, np.float64)
    return np.asarray(np.divide(n * s, denom, out=np.zeros_like(s), where=denom > 0), np.float64)


def item_bias_prior_var(
    S: FloatArray,
    N: FloatArray,
    *,
    noise_var: float,
    min_count_per_std: float = 10.0,
    min_items: int = 20,
    fallback: float = 0.25,
) -> float:
    """Empirical-Bayes prior variance of the item biases from the released S̃, Ñ (post-processing):
    over the items whose released count is at least ``min_count_per_std``·σ_S (their ratio S̃/Ñ has
    DP noise ≤ 1/``min_count_per_std`` of a unit), the mean of (S̃² − σ_S²)/Ñ² (the second moment
    of the ratio minus its DP noise variance). ``fallback`` with fewer than ``min_items`` such items
    (small data: no item is well determined)."""
    n = np.asarray(N, np.float64)
    s = np.asarray(S, np.float64)
    sel = n >= max(min_count_per_std * math.sqrt(max(noise_var, 0.0)), 1.0)
    if int(sel.sum()) < min_items:
        return float(fallback)
    est = float(np.mean((s[sel] ** 2 - noise_var) / n[sel] ** 2))
    return est if math.isfinite(est) and est > 0 else float(fallback)


def wiener_item_bias_reference(
    S: FloatArray, N: FloatArray, *, noise_var: float, prior_var: float, ridge: float
) -> FloatArray:
    """Slow twin of :func:`wiener_item_bias`: per item, the Gaussian posterior of c from
    s = n·c + e, e ~ N(0, noise_var + ridge·prior_var·n), c ~ N(0, prior_var), written as
    precision-weighted information: (n²/v) s/n / (n²/v + 1/prior_var), v the noise variance."""
    out = np.zeros(len(S))
    for i, (s, nn) in enumerate(zip(S, N, strict=True)):
        n = max(float(nn), 0.0)
        v = noise_var + ridge * prior_var * n
        if n == 0.0 or v == 0.0:
            out[i] = 0.0 if n == 0.0 else float(s) / n
            continue
        out[i] = (n * float(s) / v) / (n * n / v + 1.0 / prior_var)
    return out


# -- a private spectral start for U (one release, before the noisy U-steps) ----------------------------
def spectral_statistic(
    users: IntArray,
    items: IntArray,
    t: FloatArray,
    top_items: IntArray,
    n_users: int,
    *,
    A2: float,
    user_norm: float,
) -> FloatArray:
    """G = Σ_u s_u²·(t̂_u t̂_uᵀ − diag(t̂_u²)) over the K items ``top_items`` (K × K), t̂_u the user's
    residuals clip(t, A2) on those items and s_u = min(1, C/‖t̂_u‖₂): the off-diagonal co-rating
    second moment of the residuals. One user's term has Frobenius norm ≤ s_u²‖t̂_u‖² ≤ C²
    (:func:`spectral_sensitivity`). ``top_items`` must be chosen from public values."""
    import scipy.sparse as sp

    top = np.asarray(top_items, dtype=np.int64)
    col = np.full(int(max(int(np.max(items, initial=0)), int(np.max(top, initial=0))) + 1), -1)
    col[top] = np.arange(top.size)
    c = col[np.asarray(items, dtype=np.int64)]
    sel = c >= 0
    u, c, tv = np.asarray(users, np.int64)[sel], c[sel], clip_scalar(np.asarray(t)[sel], A2)
    s = user_norm_weights(u, tv, n_users, user_norm)
    Y = sp.csr_matrix((s[u] * tv, (u, c)), shape=(n_users, top.size))
    G = np.asarray((Y.T @ Y).toarray(), dtype=np.float64)
    np.fill_diagonal(G, 0.0)
    return G


def spectral_sensitivity(user_norm: float) -> float:
    """L2 sensitivity of :func:`spectral_statistic`: C²."""
    return float(user_norm) ** 2


def spectral_start(G: FloatArray, counts: FloatArray, r: int) -> FloatArray:
    """Rows of U for the K items of a released G (post-processing): with random raters
    G ≈ D·Q·Σ·Qᵀ·D/n (D = diag of the items' rating counts), so the top-r eigenvectors E of
    D^{-1/2}·G·D^{-1/2} span D^{1/2}·col(Q) and D^{-1/2}·E spans the item factors' subspace.
    ``counts``: released (noisy) counts of the K items. Rows scaled to mean norm 1."""
    d = np.maximum(np.asarray(counts, np.float64), 1.0) ** -0.5
    Gs = 0.5 * (G + G.T) * d[:, None] * d[None, :]
    lam, E = np.linalg.eigh(Gs)
    top = E[:, ::-1][:, :r] * np.sqrt(np.maximum(lam[::-1][:r], 0.0))
    U = top * d[:, None]
    scale = float(np.mean(np.linalg.norm(U, axis=1)))
    return np.asarray(U / scale if scale > 0 else U, dtype=np.float64)


# -- combining the L noisy U-step releases (post-processing) --------------------------------------------
def carried_item_rows(
    V: FloatArray,
    counts: FloatArray,
    M: FloatArray,
    *,
    noise_var: float,
    prior_var: float,
    ridge: float,
    prior_mean: FloatArray | None = None,
    prior_prec: FloatArray | None = None,
) -> tuple[FloatArray, FloatArray]:
    """(posterior mean, posterior precision) of each row U_i given this U-step's release
    Ṽ_i ≈ G_i·U_i + N(0, noise_var·I + ridge·prior_var·G_i) (G_i = a_i·PSD(M), the DP noise plus the
    sampling noise of :func:`wiener_item_rows`) and a Gaussian prior N(prior_mean_i, prior_prec_i⁻¹)
    per item — the previous U-step's posterior (a Kalman update: each release's information is kept
    instead of being discarded at the next step). Without ``prior_mean`` / ``prior_prec`` the prior is
    N(0, prior_var·I) and the mean equals :func:`wiener_item_rows`. In the eigenbasis (λ_k, Q) of
    M̂, with g = a_i·λ_k the likelihood adds precision g²/(noise_var + ridge·prior_var·g) and
    information g·v_k/(noise_var + ridge·prior_var·g); one r×r solve per item (batched).
    Post-processing of released values and public constants only. Precisions are returned in the
    standard basis, (n_items, r, r)."""
    if not (prior_var > 0 and noise_var >= 0 and ridge > 0):
        raise ValueError("need prior_var > 0, noise_var >= 0, ridge > 0")
    n, r = V.shape
    lam, Q = np.linalg.eigh(0.5 * (M + M.T))
    lam = np.maximum(lam, 0.0)
    a = np.maximum(np.asarray(counts, np.float64), 0.0)
    g = a[:, None] * lam[None, :]
    nv = noise_var + ridge * prior_var * g
    h = np.divide(g * g, nv, out=np.zeros_like(g), where=nv > 0)  # likelihood precision, eigenbasis
    info = np.divide((V @ Q) * g, nv, out=np.zeros_like(g), where=nv > 0)
    if prior_prec is None:
        P0 = np.broadcast_to(np.eye(r) / prior_var, (n, r, r))
    else:
        P0 = np.einsum("ka,nkl,lb->nab", Q, prior_prec, Q)  # into the eigenbasis
    m0 = np.zeros((n, r)) if prior_mean is None else np.asarray(prior_mean, np.float64) @ Q
    prec = P0 + h[:, :, None] * np.eye(r)[None]
    rhs = info + np.einsum("nab,nb->na", P0, m0)
    mean = np.linalg.solve(prec, rhs[:, :, None])[:, :, 0]
    prec_std = np.einsum("ak,nkl,bl->nab", Q, prec, Q)
    return np.asarray(mean @ Q.T, np.float64), np.asarray(prec_std, np.float64)


def drifted_precision(prec: FloatArray, drift_var: float) -> FloatArray:
    """The precision of N(m, P + drift_var·I) from that of N(m, P): the previous step's posterior
    as the next step's prior, widened for the change of the target between alternating steps."""
    if not drift_var > 0:
        return np.asarray(prec, np.float64)
    r = prec.shape[-1]
    cov = np.linalg.inv(prec) + drift_var * np.eye(r)[None]
    return np.asarray(np.linalg.inv(cov), np.float64)


def carried_item_rows_reference(
    V: FloatArray, counts: FloatArray, M: FloatArray, *, noise_var: float, prior_var: float,
    ridge: float, prior_mean: FloatArray, prior_prec: FloatArray,
) -> FloatArray:  # fmt: skip
    """Slow twin of :func:`carried_item_rows`' mean: per item, the Gaussian posterior of
    v = G u + n, n ~ N(0, noise_var·I + ridge·prior_var·G), u ~ N(m, P⁻¹), written with the
    likelihood's covariance inverted directly: (Gᵀ Σ⁻¹ G + P)⁻¹ (Gᵀ Σ⁻¹ v + P m)."""
    lam, Q = np.linalg.eigh(0.5 * (M + M.T))
    Mp = (Q * np.maximum(lam, 0.0)) @ Q.T
    r = M.shape[0]
    out = np.zeros_like(V, dtype=np.float64)
    for i in range(V.shape[0]):
        G = max(float(counts[i]), 0.0) * Mp
        Sigma = noise_var * np.eye(r) + ridge * prior_var * G
        Gt_Si = G.T @ np.linalg.pinv(Sigma) if noise_var == 0 else G.T @ np.linalg.inv(Sigma)
        out[i] = np.linalg.solve(
            Gt_Si @ G + prior_prec[i], Gt_Si @ V[i] + prior_prec[i] @ prior_mean[i]
        )
    return out


# -- the final user step: heteroscedastic weights and the released w prior (post-processing) -----------
def final_user_step(
    users: IntArray,
    items: IntArray,
    t: FloatArray,
    n_users: int,
    U: FloatArray,
    W: FloatArray,
    c: FloatArray,
    *,
    reg_w: float,
    reg_bias: float,
    row_cov: FloatArray | None = None,
    noise_var: float = 0.5625,
    noise_count: float = 5.0,
    prior_mean: FloatArray | None = None,
    prior_prec: FloatArray | None = None,
) -> tuple[FloatArray, FloatArray]:
    """(c_u, w_u) of every user by one weighted ridge on [1, U_i] against t = r − μ − c_i, from the
    released rows U (their posterior covariances ``row_cov``, (n_items, r, r)), the released w
    prior and the user's own ratings only. With ``row_cov`` each rating is weighted
    s_u²/(s_u² + w_uᵀ Cov(U_i) w_u) (generalised least squares: the noisy row adds that variance to
    the rating's error), w_u the user's current ``W`` row and s_u² the user's residual variance under
    (c, W), shrunk towards the public ``noise_var`` with ``noise_count`` pseudo-ratings. The prior
    on w_u is reg_w·(w − m)ᵀ P (w − m) (m = ``prior_mean``, P = ``prior_prec``; default 0 and I:
    the public prior of the trainer's user step). Users are processed in blocks of at most
    ``steps.sample_budget`` ratings (``steps.key_blocks``)."""
    from lrs_rec.engine.grouped import grouped_gram, grouped_sum
    from lrs_rec.engine.steps import key_blocks, sample_budget

    users = np.asarray(users, np.int64)
    items = np.asarray(items, np.int64)
    t = np.asarray(t, np.float64)
    r = U.shape[1]
    m = np.zeros(r) if prior_mean is None else np.asarray(prior_mean, np.float64)
    P = np.eye(r) if prior_prec is None else np.asarray(prior_prec, np.float64)
    c_out = np.zeros(n_users)
    W_out = np.zeros((n_users, r))
    budget = sample_budget(4 * (r + 1) ** 2)
    for u0, hi, sl in key_blocks(users, n_users, n_users, budget):
        if sl.size == 0:  # users without ratings keep (0, 0)
            continue
        n = hi - u0
        u = users[sl] - u0
        i, tt = items[sl], t[sl]
        Z = U[i]
        omega = np.ones(u.size)
        if row_cov is not None:
            Wu = np.asarray(W, np.float64)[u0:hi]
            e = tt - np.asarray(c, np.float64)[u0:hi][u] - np.einsum("nr,nr->n", Z, Wu[u])
            cnt = np.bincount(u, minlength=n).astype(np.float64)
            s2 = (np.bincount(u, e * e, minlength=n) + noise_count * noise_var) / (
                cnt + noise_count
            )
            q = np.einsum("na,nab,nb->n", Wu[u], row_cov[i], Wu[u])
            omega = s2[u] / (s2[u] + q)
        X = np.hstack([np.ones((u.size, 1)), Z])
        A = grouped_gram(u, n, X * np.sqrt(omega)[:, None])
        A[:, 0, 0] += reg_bias
        A[:, 1:, 1:] += reg_w * P[None]
        rhs = grouped_sum(u, n, X * (omega * tt)[:, None])
        rhs[:, 1:] += reg_w * (P @ m)[None]
        has = np.bincount(u, minlength=n) > 0
        sol = np.zeros((n, r + 1))
        sol[has] = np.linalg.solve(A[has], rhs[has][:, :, None])[:, :, 0]
        c_out[u0:hi][has] = sol[has, 0]
        W_out[u0:hi][has] = sol[has, 1:]
    return c_out, W_out


def final_user_step_reference(
    users: IntArray, items: IntArray, t: FloatArray, n_users: int, U: FloatArray,
    W: FloatArray, c: FloatArray, *, reg_w: float, reg_bias: float,
    row_cov: FloatArray | None = None, noise_var: float = 0.5625, noise_count: float = 5.0,
    prior_mean: FloatArray | None = None, prior_prec: FloatArray | None = None,
) -> tuple[FloatArray, FloatArray]:  # fmt: skip
    """Slow twin of :func:`final_user_step`: one user at a time, the weighted ridge written out."""
    r = U.shape[1]
    m = np.zeros(r) if prior_mean is None else np.asarray(prior_mean, np.float64)
    P = np.eye(r) if prior_prec is None else np.asarray(prior_prec, np.float64)
    c_out, W_out = np.zeros(n_users), np.zeros((n_users, r))
    for uu in np.unique(users):
        sel = np.flatnonzero(users == uu)
        Z, tt = U[items[sel]], t[sel]
        wts = np.ones(sel.size)
        if row_cov is not None:
            e = tt - c[uu] - Z @ W[uu]
            s2 = (float(e @ e) + noise_count * noise_var) / (sel.size + noise_count)
            wts = np.array([s2 / (s2 + W[uu] @ row_cov[j] @ W[uu]) for j in items[sel]])
        X = np.hstack([np.ones((sel.size, 1)), Z])
        A = X.T @ np.diag(wts) @ X
        A[0, 0] += reg_bias
        A[1:, 1:] += reg_w * P
        b = X.T @ (wts * tt)
        b[1:] += reg_w * P @ m
        sol = np.linalg.solve(A, b)
        c_out[uu], W_out[uu] = sol[0], sol[1:]
    return c_out, W_out


# -- an empirical-Bayes prior of the rows from the released U-steps (post-processing) ------------------
def carried_chain(
    releases: list[tuple[FloatArray, FloatArray, FloatArray]],
    *,
    noise_var: float,
    ridge: float,
    prior_var: float,
    prior_cov: FloatArray,
    drift: float,
) -> tuple[FloatArray, FloatArray]:
    """(mean, precision) of every row after the released U-steps ``releases`` = [(Ṽ, ã, M̂), ...]
    in order (:func:`carried_item_rows` one step after the other) from the prior N(0, prior_cov)
    for every item, each step's posterior covariance widened by drift·prior_cov as the next one's
    prior (``prior_var``: the public u0² of the likelihood's sampling-noise term). With
    prior_cov = prior_var·I it is the trainer's carried posterior (``u_carry``)."""
    if not releases:
        raise ValueError("carried_chain needs at least one release")
    r = prior_cov.shape[0]
    n = releases[0][0].shape[0]
    mean: FloatArray = np.zeros((n, r))
    prec: FloatArray = np.broadcast_to(np.linalg.inv(prior_cov), (n, r, r))
    for step, (V, counts, M) in enumerate(releases):
        pp = prec
        if step > 0 and drift > 0:
            pp = np.asarray(
                np.linalg.inv(np.linalg.inv(prec) + drift * prior_cov[None]), np.float64
            )
        mean, prec = carried_item_rows(
            V, counts, M, noise_var=noise_var, prior_var=prior_var, ridge=ridge,
            prior_mean=mean, prior_prec=pp,
        )  # fmt: skip
    return mean, prec


def eb_row_prior(
    release: tuple[FloatArray, FloatArray, FloatArray],
    *,
    noise_var: float,
    ridge: float,
    prior_var: float,
    n_iter: int = 30,
    floor: float = 1e-2,
) -> FloatArray:
    """Empirical-Bayes prior covariance Σ of the rows U_i (r × r) from one released U-step
    (Ṽ, ã, M̂) only (post-processing): EM for a Gaussian prior N(0, Σ) shared by all items,
    Σ ← mean over items of (m_i m_iᵀ + C_i) with (m_i, C_i) the rows' posterior under the current
    Σ (:func:`carried_item_rows`), from the public prior_var·I; eigenvalues floored at
    ``floor``·prior_var. With a true rank below r the unused directions get a small variance."""
    V, counts, M = release
    n, r = V.shape
    S = prior_var * np.eye(r)
    for _ in range(n_iter):
        m, P = carried_item_rows(
            V, counts, M, noise_var=noise_var, prior_var=prior_var, ridge=ridge,
            prior_mean=np.zeros((n, r)), prior_prec=np.broadcast_to(np.linalg.inv(S), (n, r, r)),
        )  # fmt: skip
        S = (m.T @ m + np.linalg.inv(P).sum(axis=0)) / n
        lam, Q = np.linalg.eigh(0.5 * (S + S.T))
        S = (Q * np.maximum(lam, floor * prior_var)) @ Q.T
    return np.asarray(S, np.float64)
