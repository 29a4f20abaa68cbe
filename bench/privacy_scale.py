"""Private training at scale: DP-AMHT-LRS (``lrs-rec train --epsilon``'s trainer, on the blockwise
engine) at 1M users against the non-private ``lrs-rec train`` on the same split.

Data: ``bench/scale.py``'s generator and split (``training.synthetic_scale.make_biased_mf``, seed 0,
20k Pareto-popular items, a seeded 90/10 split of the rows; 19.9M ratings at 1M users). Public item
features: one-hot item identity — a synthetic catalogue has no metadata, and the identity is the
data-independent choice (private ALS); the item vocabulary 0..n_items-1 is the public catalogue.

The private fit runs in a child process (``training.private_train.fit_private`` on the training
arrays; its wall time and its own peak RSS from ``os.wait4``, killed above ``--mem-cap-gb``) and
reports the test RMSE and its privacy ledger; ε is then recomputed from the ledger's events alone
(``private_accounting.recompute_epsilon``, dp_accounting). The non-private RMSE is ``lrs-rec
train``'s test RMSE on the same split, read from ``docs/results/scale.json`` (``bench/scale.py``,
``lrs_rmse`` of the same size) unless ``--nonprivate-rmse`` gives one. ``--noise-free`` adds the
same private pipeline without noise (ε = ∞: what the algorithm itself reaches).

    python bench/privacy_scale.py --users 1000000 --noise-free --curve 8,64 \
        --cli /work/data/scale/1m --json  # ~15 min (4 fits of ~2.5 min + the CLI's ~5 min)
    python bench/privacy_scale.py --users 100000 --noise-free --no-write --json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import EVAL_CHILD, measure  # noqa: E402  (bench/scale.py: child runner, wall / RSS)

SEED = 0
TARGET_RATIO = 1.05  # issue 14: private RMSE within 5 % of the non-private one

CHILD = """
import json, sys, time
import numpy as np
from lrs_rec.training.private_train import PrivateConfig, fit_private
z = np.load(sys.argv[1])
kw = json.loads(sys.argv[2])
eps = kw.pop("epsilon")
t0 = time.perf_counter()
cfg = PrivateConfig.for_data(z["tr_users"], n_items=int(z["n_items"]), epsilon=eps, **kw)
fit = fit_private(
    z["tr_users"], z["tr_items"], z["tr_ratings"], n_users=int(z["n_users"]),
    n_items=int(z["n_items"]), rating_min=1.0, rating_max=5.0, config=cfg, report_pld=False,
)
seconds = time.perf_counter() - t0
pred = fit.predict(z["te_users"].astype(np.int64), z["te_items"].astype(np.int64), 1.0, 5.0)
rmse = float(np.sqrt(np.mean((pred - z["te_ratings"]) ** 2)))
print(json.dumps({"rmse": rmse, "seconds": seconds, "privacy": fit.privacy,
                  "config": cfg.to_dict()}, default=float))
"""


def write_split(n_users: int, path: Path) -> dict[str, int]:
    from lrs_rec.training.synthetic_scale import make_biased_mf

    log = make_biased_mf(n_users, random_state=SEED)
    train, test = log.split(0.1, random_state=SEED)  # bench/scale.py's split
    np.savez(
        path, tr_users=train.users, tr_items=train.items, tr_ratings=train.ratings,
        te_users=test.users, te_items=test.items, te_ratings=test.ratings,
        n_users=log.n_users, n_items=log.n_items,
    )  # fmt: skip
    return {
        "n_users": log.n_users,
        "n_items": log.n_items,
        "n_train": len(train),
        "n_test": len(test),
    }


def nonprivate_rmse(n_users: int) -> float | None:
    path = ROOT / "docs" / "results" / "scale.json"
    if not path.is_file():
        return None
    for row in json.loads(path.read_text()).get("sizes", []):
        if row.get("n_users") == n_users and row.get("lrs_rmse") is not None:
            return float(row["lrs_rmse"])
    return None


def run_private(
    split: Path, kw: dict[str, Any], *, threads: int, mem_cap_gb: float, time_limit: float
) -> dict[str, Any]:
    res = measure(
        [sys.executable, "-c", CHILD, str(split), json.dumps(kw)],
        threads=threads, mem_cap_gb=mem_cap_gb, time_limit=time_limit, cwd=ROOT,
    )  # fmt: skip
    if not res["ok"]:
        return {"error": res["reason"]}
    line = [ln for ln in res["stdout"].splitlines() if ln.startswith("{")][-1]
    out: dict[str, Any] = json.loads(line)
    out["wall_s"] = res["wall_s"]
    out["peak_rss_mb"] = res["peak_rss_mb"]
    return out


def run_cli(
    data_dir: Path, work: Path, n_items: int, args: argparse.Namespace, caps: dict[str, Any]
) -> dict[str, Any]:
    """``lrs-rec train --epsilon`` itself on ``data_dir/train.csv`` (bench/scale.py's CSV of the same
    split; the synthetic catalogue ``i0..i{n_items-1}`` is the public item catalogue), its wall time
    and peak RSS, the test RMSE of the written model directory and ε recomputed from its manifest."""
    from lrs_rec.training.private_accounting import recompute_epsilon

    catalogue = work / "items.txt"
    catalogue.write_text("".join(f"i{k}\n" for k in range(n_items)))
    model_dir = work / "dp_model"
    lrs = [sys.executable, "-c", "from lrs_rec.serving.cli import main; raise SystemExit(main())"]
    argv = [
        *lrs, "train", "--ratings", str(data_dir / "train.csv"), "--item-catalog", str(catalogue),
        "--epsilon", str(args.epsilon), "--delta", str(args.delta), "--rating-scale", "1", "5",
        "--out", str(model_dir), "--threads", str(args.threads), "--quiet", "--json",
    ]  # fmt: skip
    r = measure(argv, cwd=ROOT, **caps)
    if not r["ok"]:
        return {"cli_error": r["reason"]}
    manifest = json.loads((model_dir / "manifest.json").read_text())
    ev = measure(
        [sys.executable, "-c", EVAL_CHILD, str(model_dir), str(data_dir / "test.csv")],
        cwd=ROOT,
        **caps,
    )
    rmse = json.loads(ev["stdout"].strip().splitlines()[-1])["rmse"] if ev["ok"] else None
    return {
        "cli_wall_s": r["wall_s"],
        "cli_peak_rss_mb": r["peak_rss_mb"],
        "cli_test_rmse": rmse,
        "cli_epsilon_from_ledger": recompute_epsilon(manifest["privacy"]),
        "cli_dims": manifest["dims"],
        "cli_config": manifest["hyperparameters"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--epsilon", type=float, default=1.0)
    ap.add_argument("--delta", type=float, default=1e-6)
    ap.add_argument("--nonprivate-rmse", type=float, default=None,
                    help="default: lrs_rmse of this size in docs/results/scale.json")  # fmt: skip
    ap.add_argument("--noise-free", action="store_true", help="also run the pipeline without noise")
    ap.add_argument("--curve", default="", help="more target ε, comma-separated (e.g. 8,64)")
    ap.add_argument("--config", default="{}", help="extra PrivateConfig fields as JSON")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mem-cap-gb", type=float, default=6.0)
    ap.add_argument("--time-limit", type=float, default=7200.0)
    ap.add_argument(
        "--work", type=Path, default=None, help="keep the split here (default: a temp dir)"
    )
    ap.add_argument(
        "--cli", type=Path, default=None, metavar="DATA_DIR",
        help="also run `lrs-rec train --epsilon` on DATA_DIR/{train,test}.csv (bench/scale.py's CSVs "
        "of the same split, e.g. /work/data/scale/1m)",
    )  # fmt: skip
    ap.add_argument("--no-write", action="store_true", help="do not write docs/results")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from lrs_rec.training.private_accounting import recompute_epsilon

    extra = json.loads(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        split = work / f"split_{args.users}.npz"
        info = write_split(args.users, split)
        common = {
            "threads": args.threads,
            "mem_cap_gb": args.mem_cap_gb,
            "time_limit": args.time_limit,
        }
        priv = run_private(split, {"epsilon": args.epsilon, "delta": args.delta, **extra}, **common)
        free = run_private(split, {"epsilon": None, **extra}, **common) if args.noise_free else None
        curve = []
        for e in (float(x) for x in args.curve.split(",") if x.strip()):
            res = run_private(split, {"epsilon": e, "delta": args.delta, **extra}, **common)
            row: dict[str, Any] = {"epsilon": e}
            if "error" in res:
                row["error"] = res["error"]
            else:
                row.update(
                    epsilon_from_ledger=recompute_epsilon(res["privacy"]),
                    private_rmse=res["rmse"],
                    private_train_s=round(res["seconds"], 1),
                    private_peak_rss_mb=res["peak_rss_mb"],
                )
            curve.append(row)
        cli = run_cli(args.cli, work, info["n_items"], args, common) if args.cli else None
    nonpriv = (
        args.nonprivate_rmse if args.nonprivate_rmse is not None else nonprivate_rmse(args.users)
    )
    result: dict[str, Any] = {
        "bench": "privacy_scale",
        "machine": f"{platform.machine()}, shared cores (measured under shared load)",
        "seed": SEED,
        **info,
        "epsilon": args.epsilon,
        "delta": args.delta,
        "features": "onehot",
        "threads": args.threads,
        "nonprivate_rmse": nonpriv,
        "nonprivate_source": (
            "--nonprivate-rmse"
            if args.nonprivate_rmse is not None
            else "docs/results/scale.json lrs_rmse (lrs-rec train, same split)"
        ),
    }
    if "error" in priv:
        result["private_error"] = priv["error"]
    else:
        ledger = priv["privacy"]
        result.update(
            epsilon_from_ledger=recompute_epsilon(ledger),
            epsilon_ledger_stored=ledger["epsilon"],
            accountant=ledger["accountant"],
            private_rmse=priv["rmse"],
            private_train_s=round(priv["seconds"], 1),
            private_wall_s=round(priv["wall_s"], 1),
            private_peak_rss_mb=priv["peak_rss_mb"],
            noise_multipliers={e["name"]: e["noise_multiplier"] for e in ledger["events"]},
            config=priv["config"],
        )
        if nonpriv is not None:
            result["ratio"] = round(priv["rmse"] / nonpriv, 4)
            result["target_ratio"] = TARGET_RATIO
            result["target_met"] = bool(priv["rmse"] / nonpriv <= TARGET_RATIO)
    if free is not None:
        result["noise_free_rmse"] = free.get("rmse")
        result["noise_free_train_s"] = None if "seconds" not in free else round(free["seconds"], 1)
    for row in curve:
        if nonpriv is not None and "private_rmse" in row:
            row["ratio"] = round(row["private_rmse"] / nonpriv, 4)
    if curve:
        result["curve"] = curve
    if cli is not None:
        result["cli"] = cli
        if nonpriv is not None and cli.get("cli_test_rmse") is not None:
            cli["cli_ratio"] = round(cli["cli_test_rmse"] / nonpriv, 4)
    if not args.no_write:
        out = ROOT / "docs" / "results" / "privacy_scale.json"
        out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, sort_keys=True) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
