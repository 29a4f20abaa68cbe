"""Privacy benchmark: RMSE of user-level DP-AMHT-LRS against the target ε, on MovieLens 100K and on
synthetic data (paper Eq. 1), for ε ∈ {0.5, 1, 2, 4, 8, ∞} at δ = 1e-6 (fixed, not 1/n^1.1).

ML-100K: ``training.private_train.fit_private`` (the code behind ``lrs-rec train --epsilon E``) with
public item features — ML-100K genres + release period from ``u.item`` ("genres") and one-hot item identity ("onehot") —
trained on u{k}.base and scored on u{k}.test. Reference: a non-private user+item bias model (the
surprise BaselineOnly ALS, re-implemented here and measured on the same folds; README: 0.9457 mean).
Synthetic: ``lrs_rec.privacy_amht.DPAMHTLRS`` on x ~ N(0, I_d), y = ⟨x, U*w*_u + b*_u⟩ + noise, RMSE on
held-out samples of the same users, and the subspace error ‖(I − ÛÛᵀ)U*‖_F.

Every private row lists the accountant's ε (RDP, the ledger's accountant) next to the target, plus the
paper's Theorem 2 zCDP bound for the same noise.

    python bench/privacy.py              # u1 + synthetic (~11 min on 2 cores), writes docs/
    python bench/privacy.py --all-folds  # u1..u5 + synthetic (~10-14 min; synthetic alone ~9 min)
    python bench/privacy.py --no-synthetic  # ML-100K only
    python bench/privacy.py --json --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ml-100k"
EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
DELTA = 1e-6
TARGET_RMSE = 0.946  # non-private user+item bias model (surprise BaselineOnly, mean u1..u5)


# -- data --------------------------------------------------------------------------------------------------
def load_fold(data: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.loadtxt(data / name, dtype=np.int64)
    return a[:, 0] - 1, a[:, 1] - 1, a[:, 2].astype(np.float64)


def baseline_only(
    u: np.ndarray,
    i: np.ndarray,
    r: np.ndarray,
    tu: np.ndarray,
    ti: np.ndarray,
    n_users: int,
    n_items: int,
    *,
    reg_u: float = 15.0,
    reg_i: float = 10.0,
    n_epochs: int = 10,
) -> np.ndarray:
    """surprise's BaselineOnly with ALS (its defaults): alternating ridge on b_i, b_u."""
    mu = float(r.mean())
    bu, bi = np.zeros(n_users), np.zeros(n_items)
    n_i = np.bincount(i, minlength=n_items)
    n_u = np.bincount(u, minlength=n_users)
    for _ in range(n_epochs):
        bi = np.bincount(i, r - mu - bu[u], n_items) / (reg_i + n_i)
        bu = np.bincount(u, r - mu - bi[i], n_users) / (reg_u + n_u)
    return np.asarray(np.clip(mu + bu[tu] + bi[ti], 1.0, 5.0))


def rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pred - truth) ** 2)))


# -- ML-100K ------------------------------------------------------------------------------------------------
def run_ml100k(data: Path, folds: list[int], features: list[str], log: Any) -> dict[str, Any]:
    from lrs_rec.training.private_train import PrivateConfig, fit_private, read_catalogue

    cat = read_catalogue(data / "u.item")
    n_users, n_items = 943, len(cat.ids)
    assert cat.ids == tuple(str(k) for k in range(1, n_items + 1))
    rows: list[dict[str, Any]] = []
    baseline: dict[str, float] = {}
    for k in folds:
        u, i, r = load_fold(data, f"u{k}.base")
        tu, ti, tr = load_fold(data, f"u{k}.test")
        baseline[f"u{k}"] = rmse(baseline_only(u, i, r, tu, ti, n_users, n_items), tr)
        for feat in features:
            for eps in EPSILONS:
                cfg = PrivateConfig(
                    epsilon=None if math.isinf(eps) else eps,
                    delta=DELTA,
                    features="plugin" if feat == "genres" else "onehot",
                    random_state=k,
                )
                t0 = time.perf_counter()
                fit = fit_private(
                    u, i, r, n_users=n_users, n_items=n_items, rating_min=1.0, rating_max=5.0,
                    config=cfg, item_features=cat.features() if feat == "genres" else None,
                    report_pld=False,
                )  # fmt: skip
                row = {
                    "fold": f"u{k}",
                    "features": feat,
                    "epsilon_target": None if math.isinf(eps) else eps,
                    "epsilon_rdp": None if fit.privacy is None else fit.privacy["epsilon_rdp"],
                    "epsilon_theorem2_zcdp": None
                    if fit.privacy is None
                    else fit.privacy["epsilon_theorem2_zcdp"],
                    "rmse": rmse(fit.predict(tu, ti, 1.0, 5.0), tr),
                    "rmse_biases_only": rmse(
                        np.clip(fit.global_mean + fit.user_bias[tu] + fit.item_bias[ti], 1, 5), tr
                    ),
                    "seconds": round(time.perf_counter() - t0, 2),
                }
                rows.append(row)
                log(f"ml100k u{k} {feat:7s} ε={eps:<4} RMSE {row['rmse']:.4f}")
    summary: dict[str, dict[str, float]] = {}
    for feat in features:
        summary[feat] = {}
        for eps in EPSILONS:
            key = "inf" if math.isinf(eps) else f"{eps:g}"
            vals = [
                x["rmse"]
                for x in rows
                if x["features"] == feat
                and (x["epsilon_target"] is None if math.isinf(eps) else x["epsilon_target"] == eps)
            ]
            summary[feat][key] = float(np.mean(vals))
    return {
        "folds": [f"u{k}" for k in folds],
        "rows": rows,
        "mean_rmse": summary,
        "bias_baseline_rmse": baseline,
        "bias_baseline_mean": float(np.mean(list(baseline.values()))),
    }


def pld_epsilons(features: list[str]) -> dict[str, dict[str, float]]:
    """PLD ε of the same ledgers (the noise does not depend on the fold), for the table."""
    from lrs_rec.training.private_accounting import epsilon_for_events
    from lrs_rec.training.private_train import PrivateConfig, plan_ledger

    out: dict[str, dict[str, float]] = {}
    for feat in features:
        out[feat] = {}
        for eps in EPSILONS:
            if math.isinf(eps):
                continue
            cfg = PrivateConfig(
                epsilon=eps, delta=DELTA, features="plugin" if feat == "genres" else "onehot"
            )
            ledger = plan_ledger(cfg, one_hot=feat == "onehot")
            assert ledger is not None
            out[feat][f"{eps:g}"] = epsilon_for_events(ledger.events, delta=DELTA, accountant="pld")
    return out


def cli_check(data: Path, log: Any) -> dict[str, Any]:
    """u1 at ε = 1 through the real command line (train --epsilon, then evaluate)."""
    from lrs_rec.serving.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m"
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["train", "--ratings", str(data / "u1.base"), "--epsilon", "1", "--delta",
                         str(DELTA), "--out", str(out), "--no-export", "--quiet", "--json"]) == 0  # fmt: skip
        train = json.loads(buf.getvalue().strip().splitlines()[-1])
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["evaluate", "--model", str(out), "--ratings", str(data / "u1.test"),
                         "--no-ranking", "--json"]) == 0  # fmt: skip
        ev = json.loads(buf.getvalue().strip().splitlines()[-1])
    res = {
        "epsilon": train["epsilon"],
        "rmse": ev["rmse"],
        "command": "lrs-rec train --epsilon 1 --delta 1e-6",
    }
    log(f"cli u1 ε=1: RMSE {res['rmse']:.4f} (ledger ε {res['epsilon']:.4f})")
    return res


# -- synthetic ---------------------------------------------------------------------------------------------
def run_synthetic(
    log: Any,
    *,
    n_users: int = 20000,
    m: int = 10,
    d: int = 10,
    rank: int = 2,
    k: int = 1,
    noise: float = 0.1,
    n_iter: int = 3,
) -> dict[str, Any]:
    from lrs_rec.training.private_accounting import EventGroup, calibrate_ledger, ledger_manifest

    from lrs_rec.privacy import ClipBounds
    from lrs_rec.privacy_amht import DPAMHTLRS
    from lrs_rec.synthetic import make_synthetic

    data = make_synthetic(n_users, 2 * m, d, rank, k, None, noise=noise, random_state=0)
    train = np.tile(np.r_[np.ones(m, bool), np.zeros(m, bool)], n_users)
    X, y, u = data.X[train], data.y[train], data.users[train]
    Xt, yt, ut = data.X[~train], data.y[~train], data.users[~train]
    # public, data-independent clip bounds (from the generative model's scales, not the data)
    bounds = ClipBounds(A1=1.3 * math.sqrt(d), A2=5.0, A3=2.0, A_w=2.5, max_samples_per_user=m)
    rows = []
    for eps in EPSILONS:
        zA = zV = 0.0
        ledger_eps = theorem2 = None
        if not math.isinf(eps):
            ledger = calibrate_ledger(
                [EventGroup("u_step_A", n_iter, 0.4, ("U",)), EventGroup("u_step_V", n_iter, 0.6, ("U",))],
                epsilon=eps, delta=DELTA,
            )  # fmt: skip
            zA, zV = ledger.noise_multiplier("u_step_A"), ledger.noise_multiplier("u_step_V")
            man = ledger_manifest(ledger, with_pld=False)
            ledger_eps, theorem2 = man["epsilon_rdp"], man["epsilon_theorem2_zcdp"]
        t0 = time.perf_counter()
        est = DPAMHTLRS(
            rank, k, n_iter=n_iter, bounds=bounds, noise_multiplier_A=zA, noise_multiplier_V=zV,
            ridge_w=1e-3, ridge_b=1e-3, random_state=0,
        ).fit(X, y, u, n_users)  # fmt: skip
        Uh = est.model_.U
        row = {
            "epsilon_target": None if math.isinf(eps) else eps,
            "epsilon_rdp": ledger_eps,
            "epsilon_theorem2_zcdp": theorem2,
            "noise_multiplier_A": zA,
            "noise_multiplier_V": zV,
            "rmse": rmse(est.model_.predict(Xt, ut), yt),
            "subspace_error": float(np.linalg.norm(data.U - Uh @ (Uh.T @ data.U))),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        rows.append(row)
        log(f"synthetic ε={eps:<4} RMSE {row['rmse']:.4f} subspace {row['subspace_error']:.4f}")
    # no shared U at all: each user fits θ_u ∈ R^d alone from m samples (ridge) — "full fine-tuning"
    G = np.einsum("nd,ne->nde", X, X)
    Gu = np.zeros((n_users, d, d))
    np.add.at(Gu, u, G)
    hu = np.zeros((n_users, d))
    np.add.at(hu, u, X * y[:, None])
    theta = np.linalg.solve(Gu + 1e-3 * np.eye(d)[None], hu[:, :, None])[:, :, 0]
    return {
        "setup": {
            "n_users": n_users,
            "samples_per_user": m,
            "d": d,
            "rank": rank,
            "sparsity": k,
            "noise": noise,
            "n_iter": n_iter,
            "clip_bounds": bounds.__dict__,
        },
        "rows": rows,
        "oracle_rmse": noise,
        "per_user_only_rmse": rmse(np.einsum("nd,nd->n", Xt, theta[ut]), yt),
    }


GOAL_SEARCH = (16.0, 32.0, 64.0, 128.0, 256.0)


def goal_search(data: Path, folds: list[int], log: Any) -> dict[str, float]:
    """Mean RMSE (genres features) at ε beyond the grid, to find the smallest ε meeting the goal."""
    from lrs_rec.training.private_train import PrivateConfig, fit_private, read_catalogue

    cat = read_catalogue(data / "u.item")
    out: dict[str, float] = {}
    for eps in GOAL_SEARCH:
        vals = []
        for k in folds:
            u, i, r = load_fold(data, f"u{k}.base")
            tu, ti, tr = load_fold(data, f"u{k}.test")
            cfg = PrivateConfig(epsilon=eps, delta=DELTA, features="plugin", random_state=k)
            fit = fit_private(
                u, i, r, n_users=943, n_items=len(cat.ids), rating_min=1.0, rating_max=5.0,
                config=cfg, item_features=cat.features(), report_pld=False,
            )  # fmt: skip
            vals.append(rmse(fit.predict(tu, ti, 1.0, 5.0), tr))
        out[f"{eps:g}"] = float(np.mean(vals))
        log(f"goal search ε={eps:g}: mean RMSE {out[f'{eps:g}']:.4f}")
    return out


# -- report --------------------------------------------------------------------------------------------------
def goal(ml: dict[str, Any]) -> dict[str, Any]:
    best_feat = "genres" if "genres" in ml["mean_rmse"] else next(iter(ml["mean_rmse"]))
    means = dict(ml["mean_rmse"][best_feat])
    means.update(ml.get("goal_search", {}))
    reached = [float(k) for k, v in means.items() if k != "inf" and v <= TARGET_RMSE]
    same_fold = ml["bias_baseline_mean"]
    reached_same = [float(k) for k, v in means.items() if k != "inf" and v <= same_fold]
    return {
        "bias_baseline_same_folds": same_fold,
        "smallest_epsilon_reaching_same_fold_baseline": min(reached_same) if reached_same else None,
        "searched_epsilons": sorted(float(k) for k in means if k != "inf"),
        "target_rmse": TARGET_RMSE,
        "features": best_feat,
        "rmse_at_epsilon_1": means.get("1"),
        "reached_at_epsilon_1": bool(means.get("1", math.inf) <= TARGET_RMSE),
        "smallest_epsilon_reaching_target": min(reached) if reached else None,
        "rmse_at_epsilon_inf": means.get("inf"),
        "folds": ml["folds"],
    }


def plot(result: dict[str, Any], path: Path) -> None:
    from lrs_rec.extras import require_extra

    matplotlib = require_extra("matplotlib", "the benchmark's figures")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = [e for e in EPSILONS if not math.isinf(e)]
    ax = axes[0]
    ml = result["ml100k"]
    names = {"genres": "genres+period", "onehot": "one-hot"}
    for feat, means in ml["mean_rmse"].items():
        name = names.get(feat, feat)
        ax.plot(xs, [means[f"{e:g}"] for e in xs], "o-", label=f"DP-LRS, {name} features")
        color = ax.lines[-1].get_color()
        if feat == "genres" and ml.get("goal_search"):
            gs = ml["goal_search"]
            ax.plot(
                [float(k) for k in gs], list(gs.values()), "o--", mfc="none", color=color,
                label=f"{name}, goal search ε > 8",
            )  # fmt: skip
        ax.axhline(means["inf"], ls=":", color=color, label=f"{name}, ε = ∞")
    ax.axhline(TARGET_RMSE, color="k", ls="--", label="non-private bias model 0.946")
    ax.axhline(ml["bias_baseline_mean"], color="gray", ls="-.", label="bias model (this bench)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("target ε (δ = 1e-6)")
    ax.set_ylabel("test RMSE")
    ax.set_title(f"MovieLens 100K ({', '.join(ml['folds'])})")
    ax.legend(fontsize=7)
    ax = axes[1]
    syn = result["synthetic"]
    ax.plot(
        xs,
        [r["rmse"] for r in syn["rows"] if r["epsilon_target"] is not None],
        "o-",
        label="DP-AMHT-LRS",
    )
    ax.axhline(syn["rows"][-1]["rmse"], ls=":", label="ε = ∞ (same clipping)")
    ax.axhline(syn["per_user_only_rmse"], color="gray", ls="-.", label="per-user only (no U)")
    ax.axhline(syn["oracle_rmse"], color="k", ls="--", label="noise floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("target ε (δ = 1e-6)")
    ax.set_title(
        "synthetic (t = {n_users}, m = {samples_per_user}, d = {d}, r = {rank}, k = {sparsity})".format(
            **syn["setup"]
        )
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ml-100k directory")
    ap.add_argument("--all-folds", action="store_true", help="u1..u5 (default: u1 only)")
    ap.add_argument("--no-onehot", action="store_true", help="skip the one-hot-feature rows")
    ap.add_argument("--no-synthetic", action="store_true", help="skip the synthetic benchmark")
    ap.add_argument("--no-goal-search", action="store_true", help="skip ε > 8 (goal search)")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/results + plot")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if not (args.data / "u1.base").is_file():
        print(f"MovieLens 100K not found at {args.data}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    folds = [1, 2, 3, 4, 5] if args.all_folds else [1]
    features = ["genres"] + ([] if args.no_onehot else ["onehot"])
    result: dict[str, Any] = {
        "delta": DELTA,
        "delta_rule": "fixed δ = 1e-6 (smaller than 1/n_users^1.1 = 5.3e-4 for 943 users)",
        "accountant": "rdp",
        "neighbouring": "add_remove_user",
        "epsilons": [None if math.isinf(e) else e for e in EPSILONS],
    }
    result["ml100k"] = run_ml100k(args.data, folds, features, log)
    result["ml100k"]["epsilon_pld"] = pld_epsilons(features)
    result["ml100k"]["cli_u1_epsilon_1"] = cli_check(args.data, log)
    if not args.no_goal_search:
        result["ml100k"]["goal_search"] = goal_search(args.data, folds, log)
    result["goal"] = goal(result["ml100k"])
    if not args.no_synthetic:
        result["synthetic"] = run_synthetic(log)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["machine"] = {"python": platform.python_version(), "cpus": __import__("os").cpu_count()}
    if not args.no_write:
        (ROOT / "docs" / "results").mkdir(parents=True, exist_ok=True)
        (ROOT / "docs" / "results" / "privacy.json").write_text(json.dumps(result, indent=2))
        if "synthetic" in result:
            plot(result, ROOT / "docs" / "img" / "privacy_rmse.png")
    if args.json:
        print(json.dumps(result))
    else:
        g = result["goal"]
        log(f"goal: RMSE at ε=1 {g['rmse_at_epsilon_1']:.4f} vs {TARGET_RMSE}; smallest ε reaching it: "
            f"{g['smallest_epsilon_reaching_target']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
