"""Privacy accounting with dp_accounting: calibration meets the target, the ledger round-trips through
JSON and is recomputed from its keys alone, Theorem 2's zCDP bound, and budget enforcement."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from lrs_rec.training.private_accounting import (
    EventGroup,
    PrivacyBudgetError,
    budget_from_env,
    calibrate_ledger,
    calibrate_single_gaussian,
    check_budget,
    ledger_manifest,
    recompute_epsilon,
    theorem2_epsilon,
    zcdp_rho,
)

GROUPS = [
    EventGroup("item_bias", 1, 0.6, ("item_bias",), sensitivity=3.0),
    EventGroup("u_step_A", 3, 0.15, ("U",), sensitivity=50.0),
    EventGroup("u_step_V", 3, 0.25, ("U",), sensitivity=125.0),
]


def _outside_recompute(privacy: dict) -> float:
    """What an outside check does: dp_accounting straight from the manifest keys."""
    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(e["noise_multiplier"]), e["count"]
        )
        for e in privacy["events"]
        if e["mechanism"] == "gaussian"
    ]
    acc = (
        rdp_privacy_accountant.RdpAccountant()
        if privacy["accountant"] == "rdp"
        else pld_privacy_accountant.PLDAccountant()
    )
    acc.compose(dp_accounting.ComposedDpEvent(events))
    return float(acc.get_epsilon(privacy["delta"]))


@pytest.mark.parametrize(("epsilon", "delta"), [(0.5, 1e-6), (1.0, 1e-6), (4.0, 1e-5), (8.0, 1e-6)])
def test_calibrated_ledger_meets_the_target_and_is_tight(epsilon, delta):
    ledger = calibrate_ledger(GROUPS, epsilon=epsilon, delta=delta, accountant="rdp")
    eps = ledger.epsilon()
    assert eps <= epsilon
    assert eps >= 0.98 * epsilon  # not wastefully loose
    # more noise on a group with a smaller budget share, per release
    z = {e["name"]: e["noise_multiplier"] for e in ledger.events}
    assert z["u_step_A"] > z["u_step_V"] > z["item_bias"]


def test_pld_calibration_meets_the_target():
    ledger = calibrate_ledger(GROUPS, epsilon=1.0, delta=1e-6, accountant="pld")
    assert ledger.epsilon() <= 1.0
    s = calibrate_single_gaussian(epsilon=1.0, delta=1e-6, accountant="pld")
    # composed Gaussians = one Gaussian with the effective multiplier (μ-GDP composition)
    assert ledger.effective_noise_multiplier >= s


def test_ledger_round_trips_through_json_and_recomputes_from_its_keys():
    ledger = calibrate_ledger(GROUPS, epsilon=2.0, delta=1e-6, accountant="rdp")
    privacy = json.loads(json.dumps(ledger_manifest(ledger, with_pld=False)))
    for key in ("epsilon", "delta", "accountant", "neighbouring", "events"):
        assert key in privacy
    assert privacy["neighbouring"] == "add_remove_user"
    for ev in privacy["events"]:
        assert ev["mechanism"] == "gaussian"
        assert ev["noise_multiplier"] > 0 and ev["count"] >= 1 and ev["releases"]
        assert ev["noise_std"] == pytest.approx(ev["noise_multiplier"] * ev["l2_sensitivity"])
    outside = _outside_recompute(privacy)
    assert outside == pytest.approx(privacy["epsilon"], rel=1e-9)
    assert recompute_epsilon(privacy) == pytest.approx(outside, rel=1e-12)
    assert outside <= privacy["target_epsilon"]


def test_theorem2_zcdp_bound_is_reported_and_looser_than_rdp():
    ledger = calibrate_ledger(GROUPS, epsilon=1.0, delta=1e-6, accountant="rdp")
    privacy = ledger_manifest(ledger, with_pld=False)
    rho = sum(e["count"] / (2 * e["noise_multiplier"] ** 2) for e in ledger.events)
    assert zcdp_rho(ledger.events) == pytest.approx(rho)
    assert privacy["zcdp_rho"] == pytest.approx(rho)
    bound = rho + 2 * math.sqrt(rho * math.log(1e6))
    assert privacy["epsilon_theorem2_zcdp"] == pytest.approx(bound)
    assert theorem2_epsilon(rho=rho, delta=1e-6) >= privacy["epsilon"]


def test_bad_targets_and_ledgers_are_rejected():
    with pytest.raises(ValueError, match="epsilon"):
        calibrate_ledger(GROUPS, epsilon=0.0, delta=1e-6)
    with pytest.raises(ValueError, match="delta"):
        calibrate_ledger(GROUPS, epsilon=1.0, delta=1.5)
    with pytest.raises(ValueError, match="mechanism"):
        recompute_epsilon(
            {"events": [{"mechanism": "laplace"}], "delta": 1e-6, "accountant": "rdp"}
        )
    with pytest.raises(ValueError, match="events"):
        recompute_epsilon({"delta": 1e-6, "accountant": "rdp"})
    with pytest.raises(ValueError, match="share"):
        EventGroup("x", 1, 0.0, ("U",))


def test_budget_check_refuses_over_budget_missing_and_tampered_ledgers(monkeypatch):
    ledger = calibrate_ledger(GROUPS, epsilon=2.0, delta=1e-6, accountant="rdp")
    manifest = {"model_version": "v1", "privacy": ledger_manifest(ledger, with_pld=False)}
    check_budget(manifest, max_epsilon=None)  # no budget configured: no check
    check_budget(manifest, max_epsilon=2.0, max_delta=1e-6)
    with pytest.raises(PrivacyBudgetError, match="exceeds the configured budget max ε = 1"):
        check_budget(manifest, max_epsilon=1.0)
    with pytest.raises(PrivacyBudgetError, match="max δ"):
        check_budget(manifest, max_epsilon=5.0, max_delta=1e-7)
    with pytest.raises(
        PrivacyBudgetError, match=r"no privacy ledger.*the configured budget is ε ≤ 10:"
    ):
        check_budget({"model_version": "v0"}, max_epsilon=10.0)  # (no "δ ≤ None")
    tampered = json.loads(json.dumps(manifest))
    tampered["privacy"]["epsilon"] = 0.1  # the stored number is not trusted
    with pytest.raises(PrivacyBudgetError, match="exceeds"):
        check_budget(tampered, max_epsilon=1.0)
    monkeypatch.setenv("LRS_MAX_EPSILON", "0.5")
    assert budget_from_env() == (0.5, None)
    assert budget_from_env(3.0) == (3.0, None)
    monkeypatch.setenv("LRS_MAX_EPSILON", "lots")
    with pytest.raises(ValueError, match="LRS_MAX_EPSILON"):
        budget_from_env()
