"""The onboarder of a trained model: one builder shared by the service (``serving.onboarding``) and
the offline model (:func:`lrs_rec.load_model`), so that a user folded in offline gets exactly the
parameters the service would store.

* schedule: the model's own (:func:`lrs_rec.model_dir.onboarding_schedule`) unless one is given;
* prior: estimated from the trained arrays (first-ratings episodes when the model stores rating
  times) — stored in the model directory at save time (``onboarding_prior_*``), estimated here for a
  model saved before that; for a differentially private model only what it releases
  (:func:`public_prior`).

:func:`shared_onboarder` builds the same onboarder from a :class:`~lrs_rec.model_dir.SharedModel`
(what ``lrs-rec serve`` loads: no per-user arrays).
"""

from __future__ import annotations

import numpy as np

from lrs_rec.model_dir import (
    ModelDirError,
    SharedModel,
    TrainedModel,
    load_model_dir,
    onboarding_schedule,
)
from lrs_rec.onboarding import (
    Onboarder,
    OnboardingConfig,
    OnboardingPrior,
    ScheduledOnboarder,
    public_prior,
)


def onboarder_from_model(
    model: TrainedModel,
    *,
    config: OnboardingConfig,
    prior: OnboardingPrior | None = None,
    history_timestamps: np.ndarray | None = None,
) -> Onboarder:
    """An :class:`Onboarder` over a trained model's arrays (the prior estimated unless given)."""
    return Onboarder.from_arrays(
        lrs=model.lrs,
        item_features=model.item_features,
        item_bias=model.item_bias,
        user_bias=model.user_bias,
        global_mean=model.global_mean,
        w_prior_mean=model.w_prior_mean,
        w_prior_cov=model.w_prior_cov,
        history_indptr=model.history_indptr,
        history_items=model.history_items,
        history_ratings=model.history_ratings,
        rating_min=model.rating_min,
        rating_max=model.rating_max,
        config=config,
        prior=prior,
        history_timestamps=history_timestamps,
    )


def build_onboarder(
    model: TrainedModel, schedule: list[tuple[int, OnboardingConfig]] | None = None
) -> ScheduledOnboarder:
    """The onboarder the service uses for ``model`` (not cached: the prior is estimated here)."""
    sched = schedule or onboarding_schedule(model.manifest)
    prior = _released_prior(model)  # None: estimated from the arrays by the Onboarder
    base = onboarder_from_model(
        model, config=sched[0][1], prior=prior, history_timestamps=model.history_timestamps
    )
    return ScheduledOnboarder.from_onboarder(base, sched)


def shared_onboarder(
    model: SharedModel, schedule: list[tuple[int, OnboardingConfig]] | None = None
) -> ScheduledOnboarder:
    """:func:`build_onboarder` for the shared part of a model directory, with the same result: the
    stored prior (or the public one of a private model). A directory saved before the prior was
    stored has its prior estimated here once, from a full load of the directory that is dropped
    right after (the per-user arrays are in memory for that moment only)."""
    sched = schedule or onboarding_schedule(model.manifest)
    prior = _released_prior(model)
    if prior is None:  # saved before priors were stored: estimated once from a full load
        prior = _legacy_prior(model)
    base = Onboarder(
        U=model.U,
        item_features=model.item_features,
        item_bias=model.item_bias,
        global_mean=float(model.global_mean),
        rating_min=float(model.rating_min),
        rating_max=float(model.rating_max),
        k=model.sparsity,
        prior=prior,
        config=sched[0][1],
    )
    return ScheduledOnboarder.from_onboarder(base, sched)


def _released_prior(model: TrainedModel | SharedModel) -> OnboardingPrior | None:
    """The prior a model directory provides: for a DP model only what it releases (w̄, Σ_w, the
    rating scale), never aggregates of the trained users' per-user arrays (docs/privacy.md);
    otherwise the one stored at save time (None for a directory saved before priors were stored)."""
    if model.manifest.get("privacy"):
        return public_prior(
            w_prior_mean=model.w_prior_mean,
            w_prior_cov=model.w_prior_cov,
            rating_min=model.rating_min,
            rating_max=model.rating_max,
            n_items=model.n_items,
        )
    return model.onboarding_prior


def _legacy_prior(model: SharedModel) -> OnboardingPrior:
    full = load_model_dir(model.root)
    if full.model_version != model.model_version or full.manifest.get(
        "arrays_sha256"
    ) != model.manifest.get("arrays_sha256"):
        raise ModelDirError(
            f"{model.root}: now holds model {full.model_version!r}, not the loaded "
            f"{model.model_version!r}: cannot estimate the onboarding prior"
        )
    onb = onboarder_from_model(
        full, config=OnboardingConfig(), history_timestamps=full.history_timestamps
    )
    return onb.prior
