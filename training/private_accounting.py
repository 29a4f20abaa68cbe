"""Privacy accounting for DP-AMHT-LRS with ``dp_accounting`` (never a hand-written accountant).

The ledger (``manifest["privacy"]``) is a list of Gaussian events ``{"mechanism": "gaussian",
"noise_multiplier": z, "count": c, "releases": [...]}``, z = noise std / L2 sensitivity under the
add/remove-one-user relation. :func:`recompute_epsilon` rebuilds the dp_accounting event from those keys
alone and returns ε at the ledger's δ — what an outside check does.

Budget split: each event group g (count c_g) gets a share p_g of the budget (Σ p_g = 1) and
z_g = s·√(c_g / p_g). Gaussian mechanisms compose exactly (μ-GDP: μ² adds), so the composition equals ONE
Gaussian mechanism with multiplier s; s is calibrated with ``dp_accounting.calibrate_dp_mechanism`` and the
composed ledger is then re-checked with the accountant (s nudged up until ε ≤ target).

For comparison we report the paper's Theorem 2 bound: the ledger is ρ-zCDP with ρ = Σ_g c_g / (2 z_g²)
(Bun & Steinke 2016), hence (ρ + 2√(ρ·log(1/δ)), δ)-DP.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lrs_rec.extras import require_extra
from lrs_rec.privacy import NEIGHBOURING

if TYPE_CHECKING:
    import dp_accounting

_PURPOSE = "differentially private training and privacy accounting"


def _dp(module: str = "dp_accounting") -> Any:
    """dp_accounting (the ``privacy`` extra), imported when a ledger is computed or checked: a
    serving host without it still publishes and serves models that carry no privacy ledger."""
    return require_extra(module, _PURPOSE)


ACCOUNTANTS = ("pld", "rdp")
DEFAULT_ACCOUNTANT = "rdp"  # fast and exact-in-form for Gaussians; "pld" is tighter but slower
PLD_DISCRETIZATION = 1e-4  # dp_accounting's default value_discretization_interval
MAX_EPSILON_ENV = "LRS_MAX_EPSILON"
MAX_DELTA_ENV = "LRS_MAX_DELTA"


class PrivacyBudgetError(ValueError):
    """A model's privacy ledger exceeds the configured budget (or has no ledger)."""


# -- events --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EventGroup:
    """A planned group of Gaussian releases: ``count`` releases sharing ``share`` of the budget."""

    name: str
    count: int
    share: float
    releases: tuple[str, ...]
    sensitivity: float = (
        1.0  # L2 sensitivity of each release (informational; z is what is accounted)
    )

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"event group {self.name!r}: count must be ≥ 1, got {self.count}")
        if not (0.0 < self.share <= 1.0):
            raise ValueError(
                f"event group {self.name!r}: share must be in (0, 1], got {self.share}"
            )


def make_accountant(accountant: str) -> dp_accounting.PrivacyAccountant:
    """A fresh dp_accounting accountant for the add/remove neighbouring relation."""
    rel = _dp().NeighboringRelation.ADD_OR_REMOVE_ONE
    if accountant == "pld":
        return _dp("dp_accounting.pld.pld_privacy_accountant").PLDAccountant(
            neighboring_relation=rel, value_discretization_interval=PLD_DISCRETIZATION
        )
    if accountant == "rdp":
        return _dp("dp_accounting.rdp.rdp_privacy_accountant").RdpAccountant(
            neighboring_relation=rel
        )
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def dp_event_from_ledger(events: Sequence[Mapping[str, Any]]) -> dp_accounting.DpEvent:
    """The composed dp_accounting event of a ledger's ``events`` list (keys as in the manifest)."""
    dp = _dp()
    parts: list[dp_accounting.DpEvent] = []
    for k, ev in enumerate(events):
        if ev.get("mechanism") != "gaussian":
            raise ValueError(f"privacy.events[{k}]: unsupported mechanism {ev.get('mechanism')!r}")
        z, c = float(ev["noise_multiplier"]), int(ev["count"])
        if not (math.isfinite(z) and z > 0) or c < 1:
            raise ValueError(f"privacy.events[{k}]: bad noise_multiplier {z!r} or count {c!r}")
        parts.append(dp.SelfComposedDpEvent(dp.GaussianDpEvent(z), c))
    return dp.ComposedDpEvent(parts)


def epsilon_for_events(
    events: Sequence[Mapping[str, Any]], *, delta: float, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """ε of the composed ledger events at ``delta`` with the named dp_accounting accountant."""
    acc = make_accountant(accountant)
    acc.compose(dp_event_from_ledger(events))
    return float(acc.get_epsilon(delta))


def recompute_epsilon(privacy: Mapping[str, Any]) -> float:
    """Recompute ε from a manifest's ``privacy`` object alone (events, delta, accountant)."""
    for key in ("events", "delta", "accountant"):
        if key not in privacy:
            raise ValueError(f"privacy ledger is missing the key {key!r}")
    return epsilon_for_events(
        privacy["events"], delta=float(privacy["delta"]), accountant=str(privacy["accountant"])
    )


def zcdp_rho(events: Sequence[Mapping[str, Any]]) -> float:
    """ρ of the ledger as zCDP: a Gaussian release with multiplier z is 1/(2z²)-zCDP; ρ adds up."""
    return float(sum(int(e["count"]) / (2.0 * float(e["noise_multiplier"]) ** 2) for e in events))


def theorem2_epsilon(*, rho: float, delta: float) -> float:
    """The paper's Theorem 2 conversion: ρ-zCDP ⇒ (ρ + 2√(ρ log(1/δ)), δ)-DP (Bun & Steinke 2016)."""
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


# -- calibration ---------------------------------------------------------------------------------------
def calibrate_single_gaussian(
    *, epsilon: float, delta: float, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """Smallest noise multiplier s of one Gaussian release with ε(s) ≤ ``epsilon`` at ``delta``."""
    _check_target(epsilon, delta)
    dp = _dp()
    mechanism_calibration = _dp("dp_accounting.mechanism_calibration")

    def eps_of(s: float) -> float:
        acc = make_accountant(accountant)
        acc.compose(dp.GaussianDpEvent(s))
        return float(acc.get_epsilon(delta))

    lo, hi = 0.05, 1.0
    while eps_of(hi) > epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 1e7:
            raise ValueError(f"cannot reach epsilon={epsilon} at delta={delta}")
    while eps_of(lo) <= epsilon:
        lo /= 2.0
    s = float(
        mechanism_calibration.calibrate_dp_mechanism(
            lambda: make_accountant(accountant),
            dp.GaussianDpEvent,
            epsilon,
            delta,
            bracket_interval=mechanism_calibration.ExplicitBracketInterval(lo, hi),
            tol=1e-6 * hi,
        )
    )
    while eps_of(s) > epsilon:  # brentq returns a root within tol: step to the safe side
        s *= 1.0 + 1e-6
    return s


@dataclass
class CalibratedLedger:
    """Noise multipliers meeting a target (ε, δ), and the ledger entries for the manifest."""

    target_epsilon: float
    target_delta: float
    accountant: str
    effective_noise_multiplier: float
    events: list[dict[str, Any]] = field(default_factory=list)

    def noise_multiplier(self, name: str) -> float:
        for ev in self.events:
            if ev["name"] == name:
                return float(ev["noise_multiplier"])
        raise KeyError(f"no event group named {name!r} in the ledger")

    def epsilon(self) -> float:
        return epsilon_for_events(self.events, delta=self.target_delta, accountant=self.accountant)


def calibrate_ledger(
    groups: Sequence[EventGroup],
    *,
    epsilon: float,
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> CalibratedLedger:
    """z_g = s·√(c_g/p_g) for every group, with s calibrated so the composed ledger has ε ≤ target."""
    _check_target(epsilon, delta)
    if not groups:
        raise ValueError("calibrate_ledger needs at least one event group")
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"event group names must be distinct, got {names}")
    total = sum(g.share for g in groups)
    shares = [g.share / total for g in groups]
    s = calibrate_single_gaussian(epsilon=epsilon, delta=delta, accountant=accountant)

    def events_for(scale: float) -> list[dict[str, Any]]:
        out = []
        for g, p in zip(groups, shares, strict=True):
            z = scale * math.sqrt(g.count / p)
            out.append(
                {
                    "name": g.name,
                    "mechanism": "gaussian",
                    "noise_multiplier": z,
                    "count": g.count,
                    "releases": list(g.releases),
                    "l2_sensitivity": g.sensitivity,
                    "noise_std": z * g.sensitivity,
                    "budget_share": p,
                }
            )
        return out

    events = events_for(s)
    # the composition equals one Gaussian with multiplier s exactly; the accountant's own
    # (discretised / RDP) answer for the composed ledger must still be within the target
    for _ in range(200):
        if epsilon_for_events(events, delta=delta, accountant=accountant) <= epsilon:
            break
        s *= 1.005
        events = events_for(s)
    else:  # pragma: no cover - the accountant would have to be wildly non-monotone
        raise RuntimeError("could not calibrate the composed ledger to the target epsilon")
    return CalibratedLedger(epsilon, delta, accountant, s, events)


def ledger_manifest(
    ledger: CalibratedLedger, *, extra: Mapping[str, Any] | None = None, with_pld: bool = True
) -> dict[str, Any]:
    """The manifest ``privacy`` object: required keys + both accountants + the Theorem 2 bound.

    ``with_pld=False`` skips the (slower) PLD number when the ledger's accountant is RDP."""
    rho = zcdp_rho(ledger.events)
    eps_rdp = epsilon_for_events(ledger.events, delta=ledger.target_delta, accountant="rdp")
    eps_pld: float | None = None
    if with_pld or ledger.accountant == "pld":
        eps_pld = epsilon_for_events(ledger.events, delta=ledger.target_delta, accountant="pld")
    privacy: dict[str, Any] = {
        "epsilon": eps_pld if ledger.accountant == "pld" else eps_rdp,
        "delta": ledger.target_delta,
        "accountant": ledger.accountant,
        "neighbouring": NEIGHBOURING,
        "events": ledger.events,
        "target_epsilon": ledger.target_epsilon,
        "epsilon_pld": eps_pld,
        "epsilon_rdp": eps_rdp,
        "zcdp_rho": rho,
        "epsilon_theorem2_zcdp": theorem2_epsilon(rho=rho, delta=ledger.target_delta),
        "effective_noise_multiplier": ledger.effective_noise_multiplier,
        "pld_value_discretization_interval": PLD_DISCRETIZATION,
        "dp_accounting": "dp_accounting.ComposedDpEvent of SelfComposedDpEvent(GaussianDpEvent(z), count)",
    }
    if extra:
        privacy.update(extra)
    return privacy


# -- budget enforcement (lrs-rec publish) -----------------------------------------------------------------
def budget_from_env(
    max_epsilon: float | None = None, max_delta: float | None = None
) -> tuple[float | None, float | None]:
    """Explicit values win; otherwise LRS_MAX_EPSILON / LRS_MAX_DELTA from the environment (or None)."""

    def read(name: str, given: float | None) -> float | None:
        if given is not None:
            return given
        raw = os.environ.get(name, "").strip()
        if not raw:
            return None
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a number") from None
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}={raw!r} must be a finite number >= 0")
        return value

    return read(MAX_EPSILON_ENV, max_epsilon), read(MAX_DELTA_ENV, max_delta)


def _budget(max_epsilon: float | None, max_delta: float | None) -> str:
    parts = [f"ε ≤ {max_epsilon:g}" if max_epsilon is not None else "",
             f"δ ≤ {max_delta:g}" if max_delta is not None else ""]  # fmt: skip
    return ", ".join(p for p in parts if p)


def check_budget(
    manifest: Mapping[str, Any],
    *,
    max_epsilon: float | None,
    max_delta: float | None = None,
    recompute: Callable[[Mapping[str, Any]], float] = recompute_epsilon,
) -> None:
    """Raise :class:`PrivacyBudgetError` if the model's ledger exceeds (max_epsilon, max_delta).

    No budget configured → no check. A model without a ledger counts as ε = ∞. The ledger's ε is
    recomputed from its events (the stored number is not trusted) and the larger of the two is used."""
    if max_epsilon is None and max_delta is None:
        return
    version = manifest.get("model_version", "?")
    privacy = manifest.get("privacy")
    if not isinstance(privacy, Mapping):
        raise PrivacyBudgetError(
            f"model {version} has no privacy ledger (trained without differential privacy, ε = ∞); "
            f"the configured budget is {_budget(max_epsilon, max_delta)}: train it with "
            "`lrs-rec train --epsilon E --delta D` or unset the budget"
        )
    try:
        eps = max(float(privacy["epsilon"]), recompute(privacy))
        delta = float(privacy["delta"])
    except (KeyError, TypeError, ValueError) as e:
        raise PrivacyBudgetError(f"model {version}: unreadable privacy ledger: {e}") from e
    if max_epsilon is not None and eps > max_epsilon:
        raise PrivacyBudgetError(
            f"model {version} spends ε = {eps:.4g} (δ = {delta:.3g}, {privacy.get('accountant')} "
            f"accountant) which exceeds the configured budget max ε = {max_epsilon:g}; refusing to "
            "publish"
        )
    if max_delta is not None and delta > max_delta:
        raise PrivacyBudgetError(
            f"model {version} has δ = {delta:.3g} which exceeds the configured budget max δ = "
            f"{max_delta:.3g}; refusing to publish"
        )


def _check_target(epsilon: float, delta: float) -> None:
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon!r}")
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
