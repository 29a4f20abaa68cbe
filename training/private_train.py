"""Private training on rating data: DP-AMHT-LRS in the billboard model (paper Sec. 2.2).

Model (the reference prediction of :class:`training.model_dir.TrainedModel`)::

    r̂(u, i) = μ + c_u + c_i + ⟨f_i, θ_u⟩,   θ_u = U·w_u + b_u

What is released (everything that leaves with the model / model.onnx) and how it is covered:

* ``item_features`` f_i — PUBLIC and data-independent: either one-hot item identity (``features="onehot"``,
  d = n_items) or plug-in features the caller declares public (e.g. ML-100K genres from ``u.item``).
* ``global_mean`` μ — Gaussian release of (Σ_u clip(mean_u − μ0, A_μ), #users), μ0 = scale midpoint.
* ``item_bias`` c_i — Gaussian releases of the per-item weighted residual sums S_i and weighted counts
  N_i (``lrs_rec.privacy.item_sum_statistics``; each user's weight s_u = min(1, √(m_b/n_u))),
  c_i = S̃_i / (max(Ñ_i, 0) + λ).
* ``U`` — L noisy U-steps (Eq. 7–8, ``lrs_rec.privacy``): each iteration releases Ã and Ṽ (two Gaussian
  events per iteration); with one-hot features only the r×r diagonal blocks of A are data-dependent.
  With one-hot features and ``u_step_gram="population"`` (the default of :meth:`PrivateConfig.for_data`)
  each iteration releases Ṽ and one global r×r second moment M of ŵ; each item's Gram is a_i·M, with
  the capped item counts a released once (events ``u_step_V``, ``u_step_M``, ``u_step_count``).
* ``w_prior_mean``, ``w_prior_cov`` (population model / onboarding prior) — one Gaussian release of
  Σ_u (ŵ_u, ŵ_uŵ_uᵀ, 1).
* the item vocabulary (``items.json``) — must be a public catalogue (``item_ids`` given by the caller).

Per-user values — c_u, w_u, b_u, the rating history — are computed from the public releases and that
user's own data only (billboard model / joint DP), by the shared blockwise engine's user step
(``lrs_rec.engine.steps.user_step``; one-hot features: ``lrs_rec.engine.onehot.user_step``, the same
step with F = I and a compressed b) with a fixed public prior on w_u. They are NOT differentially private: they may be
used only to serve that same user. The manifest's ``metrics`` (training / validation RMSE) are
operator-facing aggregates that are not covered by the guarantee; they are not part of model.onnx.

Neighbouring relation: add/remove all ratings of one user. Every Gaussian event is listed in
``manifest["privacy"]["events"]`` with its noise multiplier z = noise std / L2 sensitivity.
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from lrs_rec.training import private_cli
from lrs_rec.training.private_accounting import (
    CalibratedLedger,
    EventGroup,
    calibrate_ledger,
    ledger_manifest,
)
from lrs_rec.training.private_data import (  # noqa: F401  (re-exported: tests use them)
    LocalPrivateData,
    PrivateData,
    _Local,
    local_user_step,
    predict_samples,
    public_prior,
    step_params,
)

from lrs_rec.engine.steps import Samples, precision_shape
from lrs_rec.model import LRSModel
from lrs_rec.privacy import (
    NEIGHBOURING,
    ClipBounds,
    check_distinct_user_items,
    clip_rows,
    dp_item_block_u_step,
    dp_u_step,
    draw_selection_seed,
    gaussian_noise,
    item_sum_sensitivities,
    population_gram_sensitivities,
    psd_project,
    solve_item_population,
    symmetric_gaussian_noise,
    u_step_sensitivities,
)
from lrs_rec.privacy_items import (
    carried_chain,
    carried_item_rows,
    drifted_precision,
    eb_row_prior,
    item_bias_prior_var,
    item_rows_sensitivity,
    item_weights,
    spectral_sensitivity,
    spectral_start,
    wiener_item_bias,
    wiener_item_rows,
)

DEFAULT_SHARES: dict[str, float] = {
    "global_mean": 0.02,
    "item_bias_sum": 0.544,
    "item_bias_count": 0.291,
    "u_step_A": 0.045,
    "u_step_V": 0.075,
    "w_prior": 0.025,
}
"""Fractions of the (zCDP) budget per release group; see docs/privacy.md for how they were chosen."""

POPULATION_SHARES: dict[str, float] = {
    "global_mean": 0.02,
    "item_bias_sum": 0.25,
    "item_bias_count": 0.08,
    "u_step_count": 0.05,
    "u_step_M": 0.02,
    "u_step_V": 0.55,
    "w_prior": 0.03,
}
"""Shares of the one-hot U-step with the population Gram (``u_step_gram="population"``): the U-step
releases per item only V_i (r numbers) — the Gram is a_i·M from the capped item counts (released
once) and one global r×r second moment per iteration — so most of the budget goes to V."""

SPECTRAL_SHARE = 0.1
"""Share of the spectral start (event ``u_init``; shares are normalised to sum 1)."""

U_STEP_GRAMS = ("blocks", "population")
U_INITS = ("random", "spectral")
U_SELECTS = ("random", "popular", "weighted")
U_SOLVES = ("ridge", "posterior")
ITEM_BIAS_SOLVES = ("ratio", "posterior")


PLD_UP_TO = 2.0
"""One-hot defaults (:meth:`PrivateConfig.for_data`): the PLD accountant for target ε ≤ this (its
calibration takes seconds there and gives ~7 % less noise than RDP for the same (ε, δ) — where the noise
costs accuracy), RDP above
(PLD's grid grows with ε: ~45 s at ε = 8)."""

MAX_EPSILON = 256.0  # largest accepted target ε (the ML-100K sweep in docs/privacy.md goes to 128)


@dataclass(frozen=True)
class PrivateConfig:
    """Hyperparameters of private training. ``epsilon=None`` runs the same pipeline without noise
    (the ε = ∞ reference; no privacy ledger is written)."""

    epsilon: float | None = 1.0
    delta: float = private_cli.DEFAULT_DELTA
    features: str = "onehot"  # "onehot" (d = n_items) or "plugin" (public item_features given)
    rank: int = private_cli.DEFAULT_RANK
    sparsity: int = private_cli.DEFAULT_SPARSITY
    n_iters: int = private_cli.DEFAULT_ITERS  # L: number of noisy U-steps
    accountant: str = private_cli.DEFAULT_ACCOUNTANT
    max_samples_per_user: int = (
        private_cli.DEFAULT_MAX_SAMPLES_PER_USER
    )  # m of the U-step statistics
    bias_samples_per_user: int = 20  # m_b of the item-bias weights s_u
    bias_user_norm: float | None = (
        3.35  # C (≈ 0.75·√m_b): L2 bound of one user's clipped residual-sum vector
    )
    A2: float = 1.5  # |response| clip (ratings minus μ, c_u, c_i)
    A3: float = 1.0  # |⟨x, b_u⟩| clip
    A_w: float = 1.0  # ‖w_u‖ clip
    mean_clip: float = 1.5  # A_μ: |user mean − μ0| clip for the global mean
    ridge_u: float = 20.0  # ridge of the U-step solve (on top of PSD projection)
    reg_w: float = 5.0
    reg_b: float = 20.0
    reg_user_bias: float = 5.0
    item_bias_shrink: float = 5.0  # λ in c_i = S̃_i / (Ñ_i + λ + κ_b·σ_S)
    bias_noise_shrink: float = 3.0  # κ_b: extra shrinkage per unit of the public noise std σ_S
    # "ratio": c_i = S̃_i / (Ñ_i + λ + κ_b·σ_S); "posterior": the posterior mean of c_i under the
    # public prior N(0, item_bias_prior_var) with the public σ_S (privacy_items.wiener_item_bias)
    item_bias_solve: str = "ratio"
    # None: empirical Bayes from the released S̃, Ñ (privacy_items.item_bias_prior_var)
    item_bias_prior_var: float | None = 0.25
    u_noise_ridge: float = 2.0  # κ_u (blocks): U-step ridge += κ_u·σ_A·√(block size) (public σ_A)
    n_inner: int = 2  # local (c_u, w_u, b_u) rounds per user step
    init_scale: float = 0.1  # one-hot features: the initial U has i.i.d. N(0, init_scale²) entries
    u_step_gram: str = "blocks"  # one-hot: "blocks" (noisy r×r Gram per item) or "population"
    shares: tuple[tuple[str, float], ...] | None = None  # None: the mode's default shares
    # population U-step (one-hot), lrs_rec.privacy_items:
    # which samples of a user enter V: ≤ m at random ("random"), the ≤ m on the most popular items by
    # the released Ñ_i ("popular"), or all of them with weight min(1, √(m/n_u)) ("weighted")
    u_select: str = "random"
    u_user_norm: float | None = None  # C_V: ‖t_u‖₂ of one user's selected residuals (V)
    u_solve: str = "ridge"  # "ridge" (one ridge for all items) or "posterior" (per-item Wiener)
    u_prior_scale: float = 1.0  # posterior: prior variance u0² = scale·(A2/A_w)²/r
    u_w_sphere: bool = False  # U-step: ŵ_u = A_w·w_u/‖w_u‖ (every user's w at the clip norm)
    u_min_support: float = 0.0  # items with released Ñ_i below this never enter V (U_i = 0)
    # posterior: each U-step's prior on U_i is the previous step's posterior (Kalman; post-processing),
    # widened by u_drift·u0² per coordinate; False: every step starts from the prior N(0, u0²)
    u_carry: bool = False
    # weighted selection: items whose released Ñ_i exceeds the knee n0 enter with weight √(n0/Ñ_i)
    # (privacy_items.item_weights), n0 = u_item_snr·r·σ_V/(A_w²·u0): the weighted count at which an
    # item's per-coordinate SNR in V is u_item_snr (public: σ_V, u0). 0: every item weight 1
    u_item_snr: float = 0.0
    u_drift: float = 0.25
    # post-processing of the last user step (release order unchanged; not released): each rating
    # weighted by s_u²/(s_u² + w_uᵀCov(U_i)w_u) with the carried posterior's row covariances
    # (final_gls, needs u_carry), and/or the released w prior (w_prior_mean, the shape of
    # w_prior_cov) as the prior of w_u (final_w_prior); privacy_items.final_user_step
    final_gls: bool = False
    # u_carry: the rows' prior N(0, Σ) with Σ estimated by EM from the released U-steps so far
    # (privacy_items.eb_row_prior; post-processing), instead of the public u0²·I
    u_prior_eb: bool = False
    # population Gram: the user steps after the first U-step use the shape of the released M̂ (the
    # second moment of the normalised ŵ) as the precision shape of their prior on w_u (the public
    # N(0, I/reg_w) otherwise); post-processing
    u_step_w_prior: bool = False
    final_w_prior: bool = False
    u_init: str = "random"  # one-hot start of U: "random" or "spectral" (event u_init)
    spectral_items: int = 1000  # K: the most popular items (by the released Ñ_i) of the start
    spectral_user_norm: float = 3.0  # C_G: ‖residuals‖₂ of one user in the spectral statistic
    random_state: int | None = (
        None  # None: fresh OS entropy (the DP default); an int reproduces the noise
    )

    def __post_init__(self) -> None:
        if self.epsilon is not None and not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(
                f"epsilon must be a positive finite number or None, got {self.epsilon!r}"
            )
        if self.epsilon is not None and self.epsilon > MAX_EPSILON:
            raise ValueError(
                f"epsilon {self.epsilon:g} is above {MAX_EPSILON:g}: a guarantee of e^{MAX_EPSILON:g} "
                "says nothing, and the PLD accountant's grid grows with epsilon (73 s at 1000, "
                "out of memory at 1e7); train without --epsilon for a non-private model"
            )
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.features not in ("onehot", "plugin"):
            raise ValueError(f"features must be 'onehot' or 'plugin', got {self.features!r}")
        for name in ("rank", "n_iters", "max_samples_per_user", "bias_samples_per_user", "n_inner"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.sparsity < 0:
            raise ValueError(f"sparsity must be >= 0, got {self.sparsity!r}")
        if self.u_step_gram not in U_STEP_GRAMS:
            raise ValueError(f"u_step_gram must be one of {U_STEP_GRAMS}, got {self.u_step_gram!r}")
        if self.u_init not in U_INITS:
            raise ValueError(f"u_init must be one of {U_INITS}, got {self.u_init!r}")
        if self.u_init == "spectral" and self.features != "onehot":
            raise ValueError("u_init='spectral' needs one-hot features")
        if self.u_select not in U_SELECTS:
            raise ValueError(f"u_select must be one of {U_SELECTS}, got {self.u_select!r}")
        if self.item_bias_solve not in ITEM_BIAS_SOLVES:
            raise ValueError(
                f"item_bias_solve must be one of {ITEM_BIAS_SOLVES}, got {self.item_bias_solve!r}"
            )
        if self.item_bias_prior_var is not None and not (
            math.isfinite(self.item_bias_prior_var) and self.item_bias_prior_var > 0
        ):
            raise ValueError(
                f"item_bias_prior_var must be positive and finite, got {self.item_bias_prior_var!r}"
            )
        if self.u_solve not in U_SOLVES:
            raise ValueError(f"u_solve must be one of {U_SOLVES}, got {self.u_solve!r}")
        if self.u_user_norm is not None and not self.u_user_norm > 0:
            raise ValueError(f"u_user_norm must be positive, got {self.u_user_norm!r}")
        if int(self.spectral_items) < 1 or not self.spectral_user_norm > 0:
            raise ValueError(
                "spectral_items must be >= 1 and spectral_user_norm positive, got "
                f"{self.spectral_items!r}, {self.spectral_user_norm!r}"
            )
        if not self.u_min_support >= 0:
            raise ValueError(f"u_min_support must be >= 0, got {self.u_min_support!r}")
        if not (math.isfinite(self.u_item_snr) and self.u_item_snr >= 0):
            raise ValueError(f"u_item_snr must be finite and >= 0, got {self.u_item_snr!r}")
        if self.u_item_snr > 0 and self.u_select != "weighted":
            raise ValueError("u_item_snr needs u_select='weighted'")
        if not (math.isfinite(self.u_drift) and self.u_drift >= 0):
            raise ValueError(f"u_drift must be finite and >= 0, got {self.u_drift!r}")
        if self.u_step_w_prior and self.u_step_gram != "population":
            raise ValueError("u_step_w_prior needs u_step_gram='population'")
        if self.u_prior_eb and not self.u_carry:
            raise ValueError("u_prior_eb needs u_carry")
        if self.final_gls and not (self.u_carry and self.u_step_gram == "population"):
            raise ValueError("final_gls needs u_carry with u_step_gram='population'")
        if self.u_carry and self.u_solve != "posterior":
            raise ValueError("u_carry needs u_solve='posterior'")
        if not self.u_prior_scale > 0:
            raise ValueError(f"u_prior_scale must be positive, got {self.u_prior_scale!r}")
        if self.u_step_gram == "population" and self.features != "onehot":
            raise ValueError("u_step_gram='population' needs one-hot features")
        if self.shares is not None:
            names = {n for n, _ in self.shares}
            if names != set(self.default_shares()):
                raise ValueError(
                    f"shares must name exactly {sorted(self.default_shares())}, got {sorted(names)}"
                )

    @classmethod
    def for_data(
        cls,
        users: np.ndarray,
        *,
        n_items: int,
        epsilon: float | None,
        features: str = "onehot",
        **overrides: Any,
    ) -> PrivateConfig:
        """Defaults chosen from the SIZE of the data only — users per item, n_users / n_items
        (sizes are treated as public, like the manifest's counts; nothing else is looked at).

        One-hot features (private ALS, ``lrs_rec.privacy_items``): a private spectral start of U
        (event ``u_init``: the noisy co-rating second moment of the 200 items with the largest
        released Ñ_i, one user's residuals clipped to norm 1), then L = 3 noisy U-steps releasing
        V_i per item with the population Gram (``u_step_gram="population"``); every user's ratings
        enter V with weight σ_u·c_i and the norm clip C_V = 3 on the weighted residuals
        (σ_u = min(1, √(m/Σ_i c_i²)), m = 20; c_i = min(1, √(n0/Ñ_i)) down-weights items whose
        released count is above the knee n0 where their SNR in V reaches ``u_item_snr`` = 4), w_u
        normalised to the clip norm; each row U_i is the posterior mean under the public prior and
        the released noise scale (``u_solve="posterior"``), the previous U-step's posterior being
        the next one's prior (``u_carry``); the item biases are their posterior means under an
        empirical-Bayes prior from the released sums and counts, and the last user step takes the
        released w prior as its prior (``final_w_prior``). Accountant: PLD for ε ≤ ``PLD_UP_TO``, else RDP. No
        sparse part (with one-hot coordinates b_u only
        moves the user's own already-rated items, never a prediction for a new item, while A3
        would add to Δ_V). The rank grows with users per item ρ = n_users / n_items:
        r = clip(round(ρ / 6), 2, 8) (ML-100K: ρ = 0.56 → r = 2; 1M users × 20k items: ρ = 50 →
        r = 8), never above d = n_items (a catalogue of fewer than 8 items). Plug-in features keep the class defaults. ``overrides`` replace any of these."""
        n_users = int(np.unique(np.asarray(users)).size)
        kw: dict[str, Any] = {"epsilon": epsilon, "features": features}
        if features == "onehot":
            rho = n_users / max(n_items, 1)
            kw.update(
                u_step_gram="population",
                sparsity=0,
                max_samples_per_user=20,
                rank=int(min(np.clip(round(rho / 6), 2, 8), max(n_items, 1))),
                n_iters=3,
                init_scale=0.35,
                u_init="spectral",
                spectral_items=200,
                spectral_user_norm=1.0,
                u_select="weighted",
                u_user_norm=3.0,
                u_w_sphere=True,
                u_solve="posterior",
                u_carry=True,
                u_item_snr=4.0,
                accountant="pld" if epsilon is not None and epsilon <= PLD_UP_TO else "rdp",
                ridge_u=5.0,
                # post-processing only (no release added): the item biases' posterior mean under
                # a prior whose variance is estimated from the released sums and counts, and (below)
                # the released w prior as the prior of the last user step
                item_bias_solve="posterior",
                item_bias_prior_var=None,
            )
        kw.update(overrides)
        if features == "onehot" and "final_w_prior" not in overrides:
            kw["final_w_prior"] = kw["sparsity"] == 0  # the final step has no sparse part
        return cls(**kw)

    def default_shares(self) -> dict[str, float]:
        out = dict(POPULATION_SHARES if self.u_step_gram == "population" else DEFAULT_SHARES)
        if self.u_init == "spectral":
            out["u_init"] = SPECTRAL_SHARE
        return out

    def share_map(self) -> dict[str, float]:
        """Budget share of each release group (the given ``shares`` or the mode's default)."""
        return self.default_shares() if self.shares is None else dict(self.shares)

    def bounds(self) -> ClipBounds:
        return ClipBounds(
            A1=1.0, A2=self.A2, A3=self.A3, A_w=self.A_w,
            max_samples_per_user=self.max_samples_per_user,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Hyperparameters for the manifest; a fixed noise seed is never written (it would let anyone
        regenerate and subtract the noise)."""
        d = asdict(self)
        d["shares"] = self.share_map()
        d["random_state"] = None if self.random_state is None else "fixed (not recorded)"
        return d


@dataclass
class PrivateFit:
    """Result of :func:`fit_private`: released arrays, per-user parameters and the ledger."""

    lrs: LRSModel
    item_features: np.ndarray | None  # None: one-hot item identity (d = n_items, not materialised)
    item_bias: np.ndarray
    user_bias: np.ndarray
    global_mean: float
    w_prior_mean: np.ndarray
    w_prior_cov: np.ndarray
    privacy: dict[str, Any] | None
    noise_multipliers: dict[str, float] = field(default_factory=dict)

    def predict(self, users: np.ndarray, items: np.ndarray, lo: float, hi: float) -> np.ndarray:
        """μ + c_u + c_i + ⟨f_i, U w_u + b_u⟩, clipped; blocks of samples (no N × d array)."""
        L = self.lrs
        return predict_samples(
            self.global_mean, self.user_bias, self.item_bias, L.U, L.W, L.B_idx, L.B_val,
            self.item_features, users, items, lo, hi,
        )  # fmt: skip

    def dense_item_features(self) -> np.ndarray:
        """The released item features as an array (the identity for one-hot features)."""
        if self.item_features is None:
            return np.eye(self.lrs.d)
        return self.item_features

    def stored_factors(self) -> tuple[LRSModel, np.ndarray]:
        """(LRS model, item features) to write into a model directory. One-hot features without a
        sparse part are stored factored — item features U (n_items × r) and U = I_r, the same
        predictions ⟨e_i, U w_u⟩ = ⟨U_i, w_u⟩ — so no n_items × n_items identity is written; with a
        sparse part (b_u over item coordinates) the identity is kept."""
        L = self.lrs
        if self.item_features is None and L.sparsity == 0:
            r = L.rank
            return LRSModel(U=np.eye(r), W=L.W, B_idx=L.B_idx, B_val=L.B_val), L.U
        return L, self.dense_item_features()


# -- the ledger plan -------------------------------------------------------------------------------------
def sensitivities(cfg: PrivateConfig, *, one_hot: bool) -> dict[str, float]:
    """L2 sensitivity of each release group under add/remove-one-user."""
    dA, dV = u_step_sensitivities(cfg.bounds(), one_hot=one_hot, sparse=cfg.sparsity > 0)
    dS, dN = item_sum_sensitivities(
        A2=cfg.A2,
        max_samples_per_user=cfg.bias_samples_per_user,
        user_norm_bound=cfg.bias_user_norm,
    )
    out = {
        "global_mean": math.sqrt(cfg.mean_clip**2 + 1.0),  # (clip(mean_u − μ0), 1)
        "item_bias_sum": dS,
        "item_bias_count": dN,
        "u_step_A": dA,
        "u_step_V": dV,
        "w_prior": math.sqrt(cfg.A_w**2 + cfg.A_w**4 + 1.0),  # (ŵ, ŵŵᵀ upper triangle, 1)
    }
    if cfg.u_init == "spectral":
        out["u_init"] = spectral_sensitivity(cfg.spectral_user_norm)
    if cfg.u_step_gram == "population":
        dC, dM = population_gram_sensitivities(cfg.bounds())
        del out["u_step_A"]
        out.update(u_step_count=dC, u_step_M=dM)
        out["u_step_V"] = item_rows_sensitivity(
            m=cfg.max_samples_per_user, A2=cfg.A2, A3=cfg.A3, A_w=cfg.A_w,
            user_norm=cfg.u_user_norm, sparse=cfg.sparsity > 0,
        )  # fmt: skip
    return out


RELEASES = {
    "global_mean": ("global_mean",),
    "item_bias_sum": ("item_bias",),
    "item_bias_count": ("item_bias",),
    "u_step_A": ("U",),
    "u_step_V": ("U",),
    "u_step_count": ("U",),
    "u_step_M": ("U",),
    "w_prior": ("w_prior_mean", "w_prior_cov"),
    "u_init": ("U",),
}
ONCE = ("global_mean", "item_bias_sum", "item_bias_count", "u_step_count", "w_prior", "u_init")


def plan_ledger(cfg: PrivateConfig, *, one_hot: bool) -> CalibratedLedger | None:
    """Calibrated noise multipliers for (cfg.epsilon, cfg.delta); None when epsilon is None."""
    if cfg.epsilon is None:
        return None
    sens = sensitivities(cfg, one_hot=one_hot)
    shares = cfg.share_map()
    groups = [
        EventGroup(
            name=name,
            count=1 if name in ONCE else cfg.n_iters,
            share=shares[name],
            releases=RELEASES[name],
            sensitivity=sens[name],
        )
        for name in cfg.default_shares()
    ]
    return calibrate_ledger(groups, epsilon=cfg.epsilon, delta=cfg.delta, accountant=cfg.accountant)


# -- local (per-user) steps: only public values and the user's own ratings --------------------------------
PUBLIC_PRIOR_NOTE = (
    "the user step's prior on w_u is the fixed N(0, I / reg_w) (public): a prior estimated from the "
    "other users' w would make one user's parameters depend on the others' data"
)


# -- the private fit ---------------------------------------------------------------------------------------
def fit_private(
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    *,
    n_users: int,
    n_items: int,
    rating_min: float,
    rating_max: float,
    config: PrivateConfig,
    item_features: np.ndarray | None = None,
    report_pld: bool = True,
    user_ids: Sequence[str] | np.ndarray | None = None,
    item_ids: Sequence[str] | np.ndarray | None = None,
) -> PrivateFit:
    """DP-AMHT-LRS on ratings (dense user/item indices, one rating per (user, item)).

    ``item_features`` must be public and data-independent (plug-in mode); with ``features="onehot"``
    it must be None and the item identity is used. ``report_pld=False`` skips the (slow) PLD ε in the
    ledger when the accountant is RDP. ``user_ids`` / ``item_ids``: the id strings by index (None:
    the decimal index), keys of the random U-step selections (:class:`LocalPrivateData`)."""
    cfg = config
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    ratings = np.asarray(ratings, dtype=np.float64)
    if not (users.shape == items.shape == ratings.shape):
        raise ValueError("users, items and ratings must have the same length")
    if users.size == 0:
        raise ValueError("no ratings to train on")
    check_distinct_user_items(users, items)
    F = public_features(cfg, item_features, n_items)
    data = LocalPrivateData(
        users, items, ratings, n_users=n_users, n_items=n_items, F=F, user_ids=user_ids,
        item_ids=item_ids,
    )  # fmt: skip
    rel = release(data, cfg, F, n_items=n_items, rating_min=rating_min, rating_max=rating_max,
                  report_pld=report_pld)  # fmt: skip
    st = data.user_values(cfg.sparsity)
    return PrivateFit(
        lrs=LRSModel(U=rel.U, W=st.W, B_idx=st.B_idx, B_val=st.B_val),
        item_features=F,
        item_bias=rel.item_bias,
        user_bias=st.user_bias,
        global_mean=rel.global_mean,
        w_prior_mean=rel.w_prior_mean,
        w_prior_cov=rel.w_prior_cov,
        privacy=rel.privacy,
        noise_multipliers=rel.noise_multipliers,
    )


def public_features(
    cfg: PrivateConfig, item_features: np.ndarray | None, n_items: int
) -> np.ndarray | None:
    """The plug-in item features, rows clipped to norm A1 = 1 (None: one-hot item identity)."""
    one_hot = cfg.features == "onehot"
    if one_hot and item_features is not None:
        raise ValueError("features='onehot' takes no item_features (use features='plugin')")
    F: np.ndarray | None = None
    if not one_hot:
        if item_features is None:
            raise ValueError("features='plugin' needs public item_features (n_items, d)")
        F = clip_rows(np.asarray(item_features, dtype=np.float64), 1.0)  # A1 = 1
        if F.shape[0] != n_items:
            raise ValueError(f"item_features has {F.shape[0]} rows, expected n_items={n_items}")
    d = n_items if F is None else F.shape[1]
    if cfg.rank > d or cfg.sparsity > d:
        what = "the number of items with one-hot" if one_hot else "the width of the plug-in"
        raise ValueError(
            f"rank {cfg.rank} and sparsity {cfg.sparsity} must not exceed d={d} (--dp-rank, "
            f"--dp-sparsity; d is {what} features)"
        )
    return F


@dataclass
class Released:
    """What :func:`release` releases (the per-user values stay in the :class:`PrivateData`)."""

    U: np.ndarray
    item_bias: np.ndarray
    global_mean: float
    w_prior_mean: np.ndarray
    w_prior_cov: np.ndarray
    privacy: dict[str, Any] | None
    noise_multipliers: dict[str, float]


def release(
    data: PrivateData,
    cfg: PrivateConfig,
    F: np.ndarray | None,
    *,
    n_items: int,
    rating_min: float,
    rating_max: float,
    report_pld: bool = True,
) -> Released:
    """The private fit on ``data``: every release is a noisy sum from ``data`` (noise from one rng
    seeded by ``cfg.random_state``, drawn in a fixed order), the solves on public values only; the
    per-user steps run inside ``data``, which ends holding the final per-user values."""
    one_hot = F is None
    d = n_items if F is None else F.shape[1]
    r, k = cfg.rank, cfg.sparsity
    rng = np.random.default_rng(cfg.random_state)
    ledger = plan_ledger(cfg, one_hot=one_hot)
    sens = sensitivities(cfg, one_hot=one_hot)

    def z(name: str) -> float:
        return 0.0 if ledger is None else ledger.noise_multiplier(name)

    # 1. global mean μ (release "global_mean")
    mu0 = 0.5 * (rating_min + rating_max)
    stats = data.mean_statistic(mu0, cfg.mean_clip)
    stats += gaussian_noise(
        (2,), sensitivity=sens["global_mean"], noise_multiplier=z("global_mean"), rng=rng
    )
    global_mean = float(np.clip(mu0 + stats[0] / max(stats[1], 1.0), rating_min, rating_max))

    # 2. local user bias, then item biases (releases "item_bias_sum", "item_bias_count")
    data.start_user_bias(global_mean, cfg.reg_user_bias)
    S, N = data.item_bias_statistics(global_mean, cfg)
    S = S + gaussian_noise(
        S.shape, sensitivity=sens["item_bias_sum"], noise_multiplier=z("item_bias_sum"), rng=rng
    )
    N = N + gaussian_noise(
        N.shape, sensitivity=sens["item_bias_count"], noise_multiplier=z("item_bias_count"), rng=rng
    )
    sigma_S = z("item_bias_sum") * sens["item_bias_sum"]
    if cfg.item_bias_solve == "posterior":  # post-processing: released S̃, Ñ, public σ_S
        tau2 = cfg.item_bias_prior_var
        if tau2 is None:
            tau2 = item_bias_prior_var(S, N, noise_var=sigma_S**2)
        item_bias = wiener_item_bias(
            S, N, noise_var=sigma_S**2, prior_var=tau2,
            ridge=cfg.item_bias_shrink,
        )  # fmt: skip
    else:
        item_bias = S / (
            np.maximum(N, 0.0) + cfg.item_bias_shrink + cfg.bias_noise_shrink * sigma_S
        )

    # 3. L noisy U-steps (releases "u_step_A", "u_step_V"), per-user steps local (the engine's)
    if one_hot and cfg.u_init == "spectral":  # release "u_init": the K most popular items by Ñ
        top = np.argsort(-N, kind="stable")[: min(cfg.spectral_items, n_items)]
        G = data.spectral_statistic(global_mean, item_bias, top, cfg)
        G += symmetric_gaussian_noise(
            top.size, sensitivity=sens["u_init"], noise_multiplier=z("u_init"), rng=rng
        )
        U = np.zeros((d, r))
        U[top] = cfg.init_scale * spectral_start(G, N[top], r)
        del G
    elif one_hot:
        U = cfg.init_scale * rng.standard_normal((d, r))
    else:
        U = np.linalg.qr(rng.standard_normal((d, r)))[0]
    data.start_iterate(F, U, item_bias, global_mean, k)
    item_w = None  # per-item weights c_i of the weighted selection (u_item_snr), public
    if cfg.u_select == "weighted" and cfg.u_item_snr > 0 and cfg.u_step_gram == "population":
        u0 = math.sqrt(cfg.u_prior_scale * (cfg.A2 / cfg.A_w) ** 2 / r)
        knee = cfg.u_item_snr * r * z("u_step_V") * sens["u_step_V"] / (cfg.A_w**2 * u0)
        item_w = item_weights(N, knee)  # the released Ñ_i and public σ_V, u0, r (no noise: 1)
    # the random selections ("random", "popular") are keyed draws of (seed, user id, item id): one
    # seed from the rng here, the same on every partition of the users (the weighted one: none)
    seed = None if cfg.u_select == "weighted" else draw_selection_seed(rng)
    data.select_u_samples(cfg, N, global_mean, item_bias, seed, item_w)
    bounds = cfg.bounds()
    population = cfg.u_step_gram == "population"
    if population:  # public noise scale σ_V; the Gram needs no per-item noise
        # Wiener shrinkage: with Ṽ_i = a_i·M·U_i + N(0, σ_V²) and a public prior N(0, u0²) on the
        # entries of U_i, the MSE-optimal ridge is σ_V²/u0², whatever a_i; u0² = (A2/A_w)²/r
        # (|⟨U_i, ŵ⟩| ≲ A2 spread over r coordinates) — public constants and the public σ_V
        sigma = z("u_step_V") * sens["u_step_V"]
        ridge_u = cfg.ridge_u + sigma**2 * r * (cfg.A_w / cfg.A2) ** 2
        counts = data.u_step_counts() + gaussian_noise(
            (n_items,),
            sensitivity=sens["u_step_count"],
            noise_multiplier=z("u_step_count"),
            rng=rng,
        )
    else:
        sigma_A = z("u_step_A") * sens["u_step_A"]
        ridge_u = cfg.ridge_u + cfg.u_noise_ridge * sigma_A * math.sqrt(r if one_hot else d * r)
    carried: tuple[np.ndarray, np.ndarray] | None = None  # (mean, precision) of the last posterior
    released_steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # u_prior_eb: (Ṽ, ã, M̂)
    w_shape: np.ndarray | None = None  # u_step_w_prior: precision shape from the last released M̂
    for _ in range(cfg.n_iters):
        data.user_step(U, cfg, w_shape)
        if population:
            V, M = data.population_statistics(cfg)
            V += gaussian_noise(
                V.shape, sensitivity=sens["u_step_V"], noise_multiplier=z("u_step_V"), rng=rng
            )
            M += symmetric_gaussian_noise(
                r, sensitivity=sens["u_step_M"], noise_multiplier=z("u_step_M"), rng=rng
            )
            if cfg.u_w_sphere:  # every ŵ has norm A_w: the per-sample average has trace A_w²
                M = psd_project(M)
                M = M * (cfg.A_w**2 / max(float(np.trace(M)), 1e-12))
                total = 1.0
            else:
                total = max(float(np.maximum(counts, 0.0).sum()), 1.0)
            prior_var = cfg.u_prior_scale * (cfg.A2 / cfg.A_w) ** 2 / r
            if cfg.u_step_w_prior:
                w_shape = precision_shape(M)
            if cfg.u_carry and cfg.u_prior_eb:  # post-processing of the releases so far
                released_steps.append((V, counts, M / total))
                row_prior = eb_row_prior(
                    released_steps[-1], noise_var=sigma**2, ridge=cfg.ridge_u, prior_var=prior_var
                )
                U, prec = carried_chain(
                    released_steps, noise_var=sigma**2, ridge=cfg.ridge_u, prior_var=prior_var,
                    prior_cov=row_prior, drift=cfg.u_drift,
                )  # fmt: skip
                carried = (U, prec)
            elif cfg.u_carry:
                prior = {} if carried is None else {
                    "prior_mean": carried[0],
                    "prior_prec": drifted_precision(carried[1], cfg.u_drift * prior_var),
                }  # fmt: skip
                U, prec = carried_item_rows(
                    V, counts, M / total, noise_var=sigma**2, ridge=cfg.ridge_u,
                    prior_var=prior_var, **prior,
                )  # fmt: skip
                carried = (U, prec)
            elif cfg.u_solve == "posterior":
                U = wiener_item_rows(
                    V, counts, M / total, noise_var=sigma**2, ridge=cfg.ridge_u,
                    prior_var=cfg.u_prior_scale * (cfg.A2 / cfg.A_w) ** 2 / r,
                )  # fmt: skip
            else:
                U = solve_item_population(V, counts, M / total, ridge=ridge_u)
        elif one_hot:
            A_blk, V = data.item_block_statistics(bounds)
            U = dp_item_block_u_step(
                A_blk, V, sensitivity_A=sens["u_step_A"], sensitivity_V=sens["u_step_V"],
                noise_multiplier_A=z("u_step_A"), noise_multiplier_V=z("u_step_V"),
                ridge=ridge_u, rng=rng,
            )  # fmt: skip
        else:
            A, V = data.dense_statistics(bounds)
            U = dp_u_step(
                A, V, sensitivity_A=sens["u_step_A"], sensitivity_V=sens["u_step_V"],
                noise_multiplier_A=z("u_step_A"), noise_multiplier_V=z("u_step_V"),
                ridge=ridge_u, rng=rng,
            )  # fmt: skip
    data.user_step(U, cfg, w_shape)

    # 4. population prior of w (release "w_prior")
    iu = np.triu_indices(r)
    vec = data.w_prior_statistic(cfg.A_w, r)
    vec += gaussian_noise(
        vec.shape, sensitivity=sens["w_prior"], noise_multiplier=z("w_prior"), rng=rng
    )
    n_tilde = max(vec[-1], 1.0)
    w_mean = vec[:r] / n_tilde
    second = np.zeros((r, r))
    second[iu] = vec[r : r + len(iu[0])]
    second = (second + np.triu(second, 1).T) / n_tilde
    w_cov = psd_project(second - np.outer(w_mean, w_mean)) + 1e-6 * np.eye(r)

    # 5. (post-processing) one more user step: GLS weights from the rows' posterior covariance
    # and / or the released w prior; per-user values only, nothing more is released
    if cfg.final_gls or cfg.final_w_prior:
        row_cov = None
        if cfg.final_gls:
            assert carried is not None  # __post_init__: final_gls needs u_carry
            row_cov = np.linalg.inv(carried[1])
        w_prior = (w_mean, precision_shape(w_cov)) if cfg.final_w_prior else None
        data.final_user_step(U, cfg, row_cov, w_prior)

    privacy = None
    if ledger is not None:
        privacy = ledger_manifest(
            ledger, extra=_ledger_extra(cfg, one_hot, sens), with_pld=report_pld
        )
    return Released(
        U=U,
        item_bias=item_bias,
        global_mean=global_mean,
        w_prior_mean=w_mean,
        w_prior_cov=w_cov,
        privacy=privacy,
        noise_multipliers={}
        if ledger is None
        else {e["name"]: e["noise_multiplier"] for e in ledger.events},
    )


def _ledger_extra(cfg: PrivateConfig, one_hot: bool, sens: dict[str, float]) -> dict[str, Any]:
    feature_cover = (
        "public: one-hot item identity (data-independent)"
        if one_hot
        else "public: plug-in item features declared public by the caller (not computed from ratings)"
    )
    return {
        "neighbouring_description": (
            "datasets differ by adding or removing ALL ratings of one user (user-level DP)"
        ),
        "model": "billboard / joint DP (paper Sec. 2.2)",
        "iterations": cfg.n_iters,
        "clip_bounds": {
            "A1": 1.0,
            "A2": cfg.A2,
            "A3": cfg.A3,
            "A_w": cfg.A_w,
            "A_mu": cfg.mean_clip,
            "max_samples_per_user": cfg.max_samples_per_user,
            "bias_samples_per_user": cfg.bias_samples_per_user,
        },
        "sensitivities": sens,
        "features": cfg.features,
        "u_step_gram": cfg.u_step_gram,
        "released_arrays": {
            "item_features": feature_cover,
            "item_ids": "public: the item catalogue supplied by the caller",
            "rating_scale": "public: given by the caller (must not be read off the ratings)",
            "global_mean": "private: event global_mean",
            "item_bias": "private: events item_bias_sum, item_bias_count",
            "U": (
                f"private: events u_step_count, u_step_M, u_step_V ({cfg.n_iters} noisy U-steps, "
                "Eq. 7-8 with the population Gram a_i·M)"
                if cfg.u_step_gram == "population"
                else f"private: events u_step_A, u_step_V ({cfg.n_iters} noisy U-steps, Eq. 7-8)"
            )
            + (
                "; its start: event u_init (noisy co-rating second moment of the "
                f"{cfg.spectral_items} items with the largest released item_bias_count)"
                if cfg.u_init == "spectral"
                else ""
            ),
            "w_prior_mean": "private: event w_prior",
            "w_prior_cov": "private: event w_prior",
        },
        "per_user_not_private": {
            "W": "w_u from public releases + the user's own ratings; serve that user only",
            "B_idx/B_val": "b_u, likewise",
            "user_bias": "c_u, likewise",
            "history_*": "the user's own training ratings, likewise",
        },
        "not_covered": [
            "manifest metrics (operator-facing training/validation RMSE; not in model.onnx)",
            "manifest data/dims counts (n_users, n_ratings; operator-facing, not in model.onnx)",
        ],
        "noise_seed": (
            "fresh OS entropy (not recorded)"
            if cfg.random_state is None
            else "FIXED seed (reproducible run): the guarantee holds only while the seed stays secret"
        ),
        "neighbouring": NEIGHBOURING,
        "config": cfg.to_dict(),
    }


# -- public item catalogues (the item vocabulary and plug-in genre features) ------------------------------
@dataclass(frozen=True)
class Catalogue:
    """A public item catalogue: ids (the released item vocabulary) and optional genre flags."""

    ids: tuple[str, ...]
    genres: np.ndarray | None  # (n, g) 0/1, or None
    source: str
    periods: np.ndarray | None = (
        None  # (n, 5) 0/1 release period (<1960, 60-79, 80-89, 90-94, ≥1995)
    )

    def features(self) -> np.ndarray | None:
        """Public metadata features for ``--dp-features genres``: genre flags (+ release period)."""
        if self.genres is None:
            return None
        return self.genres if self.periods is None else np.hstack([self.genres, self.periods])


PERIOD_EDGES = (1960, 1980, 1990, 1995)


def release_periods(years: np.ndarray) -> np.ndarray:
    """One-hot release period of each item (all zeros when the year is unknown, i.e. 0)."""
    years = np.asarray(years, dtype=np.int64)
    bucket = np.searchsorted(np.asarray(PERIOD_EDGES), years, side="right")
    out = np.zeros((years.size, len(PERIOD_EDGES) + 1))
    known = years > 0
    out[np.flatnonzero(known), bucket[known]] = 1.0
    return out


def read_catalogue(path: str | Path) -> Catalogue:
    """Read a public item catalogue: MovieLens ``u.item`` (100K), ``movies.dat`` (1M), ``movies.csv``
    (latest) — ids and genres — or a plain id list (one per line, or a JSON list)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such item catalogue")
    text = p.read_text(encoding="latin-1")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if p.suffix == ".json":
        ids = json.loads(text)
        if not isinstance(ids, list):
            raise ValueError(f"{p}: expected a JSON list of item ids")
        return Catalogue(tuple(str(i) for i in ids), None, str(p))
    if p.name == "u.item" or (lines and lines[0].count("|") >= 23):
        ids, rows, years = [], [], []
        for n, ln in enumerate(lines, 1):
            parts = ln.split("|")
            if len(parts) < 24:
                raise ValueError(f"{p}:{n}: expected 24 '|'-separated fields, got {len(parts)}")
            ids.append(parts[0].strip())
            date = parts[2].strip()
            years.append(int(date[-4:]) if date[-4:].isdigit() else 0)
            try:
                rows.append([int(x) for x in parts[5:24]])
            except ValueError:
                raise ValueError(f"{p}:{n}: genre flags must be 0/1") from None
        return Catalogue(
            tuple(ids), np.asarray(rows, dtype=np.float64), str(p), release_periods(np.array(years))
        )
    sep = "::" if "::" in lines[0] else ("," if p.suffix == ".csv" else None)
    if sep is not None:
        start = 1 if sep == "," and not lines[0].split(",")[0].strip().isdigit() else 0
        ids, genre_lists = [], []
        for ln in lines[start:]:
            first = ln.split(sep, 1)[0].strip()
            ids.append(first)
            genre_lists.append(ln.rsplit("::" if sep == "::" else ",", 1)[-1].strip().split("|"))
        vocab = sorted({g for gl in genre_lists for g in gl})
        col = {g: j for j, g in enumerate(vocab)}
        G = np.zeros((len(ids), len(vocab)))
        for a, gl in enumerate(genre_lists):
            G[a, [col[g] for g in gl]] = 1.0
        return Catalogue(tuple(ids), G, str(p))
    return Catalogue(tuple(ln.strip() for ln in lines), None, str(p))


_CATALOGUE_NAMES = ("u.item", "movies.dat", "movies.csv")


def find_catalogue(ratings_path: str | Path) -> Path | None:
    """A MovieLens catalogue next to the rating file (public metadata), if any."""
    folder = Path(ratings_path).resolve().parent
    return next((folder / n for n in _CATALOGUE_NAMES if (folder / n).is_file()), None)


# -- `lrs-rec train --epsilon E --delta D` (flags: training.private_cli) --------------------------------
def _public_items(
    args: argparse.Namespace,
) -> tuple[tuple[str, ...], np.ndarray | None, str, str, str | None]:
    """(item ids, public features or None, where the features come from — "plugin" (a plug-in
    file), "genres" (the catalogue's genre flags) or "onehot" —, provenance of the item ids,
    provenance of the features for the ledger — None for one-hot, which the ledger describes
    itself)."""
    mode = getattr(args, "dp_features", "auto")
    cat_path = getattr(args, "item_catalog", None) or find_catalogue(args.ratings)
    cat = read_catalogue(cat_path) if cat_path else None
    if mode in ("auto", "plugin") and getattr(args, "item_features", None):
        from lrs_rec.training.features import read_item_features

        ids, X = read_item_features(args.item_features)
        declared = (
            f"public: plug-in item features from {args.item_features}, declared public by the "
            "caller (not computed from ratings)"
        )
        if cat is not None:
            pos = {s: j for j, s in enumerate(ids)}
            F = np.zeros((len(cat.ids), X.shape[1]))
            for a, s in enumerate(cat.ids):
                if s in pos:
                    F[a] = X[pos[s]]
            return cat.ids, F, "plugin", f"public catalogue {cat.source}", declared
        return (
            tuple(ids),
            X,
            "plugin",
            f"ids of the plug-in features {args.item_features}",
            declared,
        )
    if mode == "plugin":
        raise ValueError("--dp-features plugin needs --item-features PATH")
    if cat is None:
        if mode == "genres":
            raise ValueError("--dp-features genres needs a MovieLens catalogue (--item-catalog)")
        return (), None, "onehot", "", None
    if mode in ("auto", "genres") and cat.genres is not None:
        genres = (
            f"public: genre flags and release period from the catalogue {cat.source} "
            "(item metadata, not computed from ratings)"
        )
        return cat.ids, cat.features(), "genres", f"public catalogue {cat.source}", genres
    if mode == "genres":
        raise ValueError(f"{cat.source}: the catalogue has no genres")
    return cat.ids, None, "onehot", f"public catalogue {cat.source}", None


def public_rating_scale(declared: tuple[float, float] | None, fmt: str) -> str:
    """Where the rating scale comes from, for the ledger; refuses a scale read off the ratings.

    The scale is released as is (model.onnx's Clip bounds and metadata, ``GET /v1/model``) and
    centres the private global mean (μ0 = its midpoint), so it must not depend on the private data:
    a declared ``--rating-scale`` or the fixed scale of a MovieLens format. A generic file's default
    (the observed min/max of the ratings) would release one user's most extreme rating exactly."""
    from lrs_rec.training.loaders import ML_SCALES

    if declared is not None:
        return "public: declared by the caller (--rating-scale)"
    if fmt in ML_SCALES:
        return f"public: the fixed scale of the {fmt} format"
    raise ValueError(
        f"private training on a {fmt} file needs a declared rating scale (--rating-scale MIN MAX): "
        "the default, the observed range of the ratings, would be released without privacy"
    )


_CLI_FIELDS = {
    "dp_rank": "rank",
    "dp_sparsity": "sparsity",
    "dp_iters": "n_iters",
    "dp_max_samples_per_user": "max_samples_per_user",
    "dp_u_step_gram": "u_step_gram",
}


def cli_config(
    args: argparse.Namespace, mode: str, users: np.ndarray, n_items: int
) -> PrivateConfig:
    """The PrivateConfig of `lrs-rec train --epsilon`: the flags given explicitly, the rest from
    :meth:`PrivateConfig.for_data` (one-hot features: chosen from the data sizes) or the class
    defaults (plug-in features)."""
    given = {
        field_: getattr(args, flag) for flag, field_ in _CLI_FIELDS.items()
        if getattr(args, flag, None) is not None
    }  # fmt: skip
    given.update(
        delta=float(args.delta),
        random_state=getattr(args, "dp_noise_seed", None),
    )
    if getattr(args, "accountant", None) is not None:  # else the configuration's default
        given["accountant"] = str(args.accountant)
    if mode == "onehot":
        return PrivateConfig.for_data(
            users, n_items=n_items, epsilon=float(args.epsilon), features=mode, **given
        )
    return PrivateConfig(epsilon=float(args.epsilon), features=mode, **given)


def run(args: argparse.Namespace) -> int:
    """`lrs-rec train --epsilon E [--delta D] ...`: private training into a model directory."""
    import sys

    from lrs_rec.training.cli_args import load_options
    from lrs_rec.training.loaders import load_ratings
    from lrs_rec.training.pipeline import history_csr
    from lrs_rec.training.vocab import Vocabulary

    from lrs_rec.model_dir import TrainedModel, save_model_dir

    t0 = time.perf_counter()
    opts = load_options(args)
    table = load_ratings(args.ratings, opts)
    scale_provenance = public_rating_scale(opts.rating_scale, table.report.format)
    item_ids, feats, source, provenance, feature_provenance = _public_items(args)
    mode = "onehot" if source == "onehot" else "plugin"  # the algorithm: fixed public features
    dropped = 0
    if (
        not item_ids
    ):  # no public catalogue: the vocabulary comes from the data (declared, not private)
        item_ids = Vocabulary.from_ids(table.items).ids
        provenance = (
            "NOT covered by the guarantee: taken from the training ratings because no public "
            "catalogue was given (pass --item-catalog)"
        )
        print(f"warning: item vocabulary {provenance}", file=sys.stderr)
    user_vocab = Vocabulary.from_ids(table.users)
    item_vocab = Vocabulary(tuple(item_ids))
    u = user_vocab.encode(table.users)
    i = item_vocab.encode(table.items)
    ok = i >= 0
    dropped = int((~ok).sum())
    if dropped:
        print(
            f"warning: {dropped} ratings of items not in the catalogue were dropped",
            file=sys.stderr,
        )
    data = Samples(u[ok], i[ok], table.ratings[ok])
    cfg = cli_config(args, mode, data.users, len(item_vocab))
    fit = fit_private(
        data.users, data.items, data.ratings,
        n_users=len(user_vocab), n_items=len(item_vocab),
        rating_min=table.rating_min, rating_max=table.rating_max,
        config=cfg, item_features=feats, user_ids=user_vocab.ids, item_ids=item_vocab.ids,
    )  # fmt: skip
    assert fit.privacy is not None
    train_rmse = float(
        np.sqrt(
            np.mean(
                (
                    fit.predict(data.users, data.items, table.rating_min, table.rating_max)
                    - data.ratings
                )
                ** 2
            )
        )
    )
    indptr, h_items, h_ratings = history_csr(data, len(user_vocab))
    seconds = time.perf_counter() - t0
    lrs, item_features = fit.stored_factors()
    manifest = private_manifest(
        cfg,
        fit.privacy,
        data={
            "source": table.report.source,
            "format": table.report.format,
            "fingerprint_sha256": table.fingerprint,
            "n_ratings": len(data),
            "n_users": len(user_vocab),
            "n_items": len(item_vocab),
            "dropped_not_in_catalogue": dropped,
        },
        cleaning=table.report.to_dict(),
        items=(provenance, scale_provenance, source, feature_provenance),
        d=fit.lrs.d,
        factored_d=lrs.d if fit.item_features is None and lrs is not fit.lrs else None,
        train_rmse=train_rmse,
        seconds=seconds,
    )
    model = TrainedModel(
        lrs=lrs,
        item_features=item_features,
        item_bias=fit.item_bias,
        user_bias=fit.user_bias,
        global_mean=fit.global_mean,
        user_ids=user_vocab.ids,
        item_ids=item_vocab.ids,
        w_prior_mean=fit.w_prior_mean,
        w_prior_cov=fit.w_prior_cov,
        history_indptr=indptr,
        history_items=h_items,
        history_ratings=h_ratings,
        rating_min=table.rating_min,
        rating_max=table.rating_max,
        manifest=manifest,
    )
    saved = save_model_dir(model, args.out)
    report_run(
        args, saved.model_version, saved.manifest, fit.privacy, train_rmse=train_rmse,
        seconds=seconds, source=source,
    )  # fmt: skip
    return 0


def private_manifest(
    cfg: PrivateConfig,
    privacy: dict[str, Any],
    *,
    data: dict[str, Any],
    cleaning: dict[str, Any],
    items: tuple[str, str, str, str | None],
    d: int,
    factored_d: int | None,
    train_rmse: float,
    seconds: float,
) -> dict[str, Any]:
    """The manifest of a private model (either engine). ``items``: provenance of the item ids, of
    the rating scale, the features' source and the features' provenance (:func:`_public_items`);
    ``factored_d``: the stored d of a one-hot model written factored (item features U, U = I_r)."""
    provenance, scale_provenance, source, feature_provenance = items
    privacy["released_arrays"]["item_ids"] = provenance
    privacy["released_arrays"]["rating_scale"] = scale_provenance
    privacy["features_source"] = source
    if feature_provenance is not None:
        privacy["released_arrays"]["item_features"] = feature_provenance
    manifest: dict[str, Any] = {
        "method": "dp-lrs",
        "hyperparameters": cfg.to_dict(),
        "data": data,
        "cleaning": cleaning,
        "item_features": {"source": source if source == "onehot" else provenance, "d": d},
        "metrics": {"train_rmse": train_rmse, "val_rmse": None, "train_seconds": round(seconds, 3)},
        "params_per_user": cfg.rank + cfg.sparsity,
        "privacy": privacy,
        # not the default digest-derived id: a hash of all arrays (per-user ones and the raw history
        # included) would let anyone holding candidate datasets test them against the model
        "model_version": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        + "-"
        + secrets.token_hex(5),
    }
    if factored_d is not None:  # one-hot, stored F = U, U = I_r
        privacy["released_arrays"]["item_features"] = (
            "private: the one-hot model's U (events u_step_*), stored as item features "
            "with U = I_r (⟨e_i, U w⟩ = ⟨U_i, w⟩): no n_items × n_items identity"
        )
        manifest["item_features"] = {"source": "onehot-factored", "d": factored_d}
    return manifest


def report_run(
    args: argparse.Namespace,
    model_version: str,
    manifest: dict[str, Any],
    privacy: dict[str, Any],
    *,
    train_rmse: float,
    seconds: float,
    source: str,
) -> None:
    """Export model.onnx (unless --no-export) and print the run's summary (--json: one line)."""
    onnx_path: str | None = None
    if not getattr(args, "no_export", False):
        from lrs_rec.training.export import export_model_dir

        onnx_path = str(export_model_dir(args.out))
    p = privacy
    dims = manifest["dims"]
    summary = {
        "model_dir": str(args.out),
        "model_version": model_version,
        "method": "dp-lrs",
        "dims": dims,
        "n_ratings": manifest["data"]["n_ratings"],
        "train_rmse": train_rmse,
        "epsilon": p["epsilon"],
        "delta": p["delta"],
        "accountant": p["accountant"],
        "target_epsilon": p["target_epsilon"],
        "epsilon_theorem2_zcdp": p["epsilon_theorem2_zcdp"],
        "onnx": onnx_path,
        "train_seconds": round(seconds, 3),
    }
    if getattr(args, "json", False):
        print(json.dumps(summary, sort_keys=True))
    else:
        print(
            f"wrote {args.out} (version {model_version}): user-level DP ε = {p['epsilon']:.4g} "
            f"(target {p['target_epsilon']:g}), δ = {p['delta']:g}, {p['accountant']} accountant; "
            f"{manifest['data']['n_users']} users, {manifest['data']['n_items']} items, "
            f"features {source}" + (f"; ONNX {onnx_path}" if onnx_path else "")
        )
