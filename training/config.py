"""The frozen, validated training configuration (every hyperparameter of `lrs-rec train`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

METHODS = ("lrs", "single", "full", "rep", "prompt")

METHOD_HELP = {
    "lrs": "AMHT-LRS: θ_u = U·w_u + b_u (rank r + k-sparse), the default",
    "single": "one shared θ for everyone (no per-user parameters, no user bias)",
    "full": "full fine-tuning: a free θ_u ∈ R^d per user (d parameters per user)",
    "rep": "representation learning: θ_u = U·w_u (rank r only, no sparse part)",
    "prompt": "prompt learning: a shared θ plus a learned per-user offset (a user bias)",
}


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters. Defaults are the ones `lrs-rec train` uses, chosen by validation on a
    held-out part of ML-100K u1.base only (never on a test fold); see docs/movielens.md."""

    method: str = "lrs"
    rank: int = 16  # r: dimension of the shared subspace U (d × r)
    sparsity: int = 4  # k: non-zeros of each user's sparse correction b_u
    dim: int = 32  # d: item-feature dimension (ignored in plug-in mode: the file decides)
    n_iter: int = 10  # outer alternations (user step, item step)
    reg_w: float = 10.0  # ridge on w_u, towards the population prior N(w̄, Σ_w)
    population_prior: bool = True  # Σ_w-shaped ridge on w_u (False: isotropic λ_w·I)
    conditional_prior: bool = True  # prior mean of w_u conditioned on the set of rated items
    reg_b: float = 20.0  # ridge on the k non-zeros of b_u
    reg_features: float = 20.0  # ridge on item features f_i in the refinement step
    reg_bias: float = 5.0  # ridge on user / item biases c_u, c_i
    # ridge of the U step (Eq. 5, fixed features only), relative to its curvature; None = auto:
    # 10 for ALS features fitted on the same ratings (--fixed-features), 0.01 for plug-in features
    reg_u: float | None = None
    init_reg: float = 0.15  # ALS-WR (λ·n per row) for the initial item features
    init_iter: int = 10
    init_reg_count: float = 20.0  # ALS-WR ridge λ·max(n, this) per row: a floor for sparse rows
    # after the first ALS iteration, this many conjugate-gradient steps per row from the previous
    # iterate instead of an exact solve (0: exact every iteration; docs/scale.md)
    init_cg_steps: int = 2
    refine_features: bool = True  # alternate item features with users' θ (off in plug-in mode)
    validation_fraction: float = 0.05  # internal split of the training ratings for the val loss
    patience: int = 2  # early stopping on the validation loss (0: off); the best iterate is kept
    final_passes: int = 1  # passes on all ratings (validation split included) after the loop
    seed: int = 0
    # data-scaled regularisation and model choice (docs/accuracy.md)
    standardize: bool = True  # work in units of the ratings' spread (strengths scale-free)
    keep_best: bool = True  # keep the start when no LRS iteration beats it on validation
    tune: bool = True  # choose the ridge strengths on the validation split (training/tuning.py)
    tune_trials: int = 3  # extra LRS fits the tuning may run (reproducible budget)
    tune_seconds: float | None = None  # optional wall-clock cap on them (machine-dependent)
    # tune on a seeded sample of this many users when there are more (None: all users); the
    # chosen strengths are then applied to one fit on all users (docs/scale.md)
    tune_sample_users: int | None = 50_000

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        for name in ("rank", "dim", "n_iter", "init_iter"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sparsity < 0:
            raise ValueError(f"sparsity must be >= 0, got {self.sparsity}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        if self.init_cg_steps < 0:
            raise ValueError(f"init_cg_steps must be >= 0, got {self.init_cg_steps}")
        if self.final_passes < 0:
            raise ValueError(f"final_passes must be >= 0, got {self.final_passes}")
        for name in ("reg_w", "reg_b", "reg_features", "reg_bias", "reg_u", "init_reg"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.tune_trials < 0:
            raise ValueError(f"tune_trials must be >= 0, got {self.tune_trials}")
        if self.tune_sample_users is not None and self.tune_sample_users < 1:
            raise ValueError(f"tune_sample_users must be >= 1, got {self.tune_sample_users}")
        if self.tune_seconds is not None and not self.tune_seconds >= 0:
            raise ValueError(f"tune_seconds must be >= 0, got {self.tune_seconds}")
        if not 0.0 <= self.validation_fraction < 0.5:
            raise ValueError(
                f"validation_fraction must be in [0, 0.5), got {self.validation_fraction}"
            )

    def check_dims(self, d: int) -> None:
        """Rank and sparsity must fit in the feature dimension d actually used."""
        if self.method in ("lrs", "rep") and self.rank > d:
            raise ValueError(f"rank r={self.rank} exceeds the item-feature dimension d={d}")
        if self.method == "lrs" and self.sparsity > d:
            raise ValueError(f"sparsity k={self.sparsity} exceeds the item-feature dimension d={d}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
