"""The onboarder of a trained model: one builder shared by the service (``serving.onboarding``) and
the offline model (:func:`lrs_rec.load_model`), so that a user folded in offline gets exactly the
parameters the service would store.

* schedule: the model's own (:func:`lrs_rec.model_dir.onboarding_schedule`) unless one is given;
* prior: estimated from the trained arrays (first-ratings episodes when the model stores rating
  times); for a differentially private model only what it releases (:func:`public_prior`).
"""

from __future__ import annotations

import numpy as np

from lrs_rec.model_dir import TrainedModel, onboarding_schedule
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
    prior = None
    if model.manifest.get("privacy"):
        # a DP model: onboard from what it releases only (w̄, Σ_w, the rating scale), never from
        # aggregates of the trained users' per-user arrays (docs/privacy.md)
        prior = public_prior(
            w_prior_mean=model.w_prior_mean,
            w_prior_cov=model.w_prior_cov,
            rating_min=model.rating_min,
            rating_max=model.rating_max,
            n_items=model.n_items,
        )
    base = onboarder_from_model(
        model, config=sched[0][1], prior=prior, history_timestamps=model.history_timestamps
    )
    return ScheduledOnboarder.from_onboarder(base, sched)
