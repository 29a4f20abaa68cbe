"""Private training on ratings: reproducible with a seed, every released array covered by the ledger,
`lrs-rec train --epsilon/--delta` writes a ledger that recomputes from the manifest alone, and
`lrs-rec publish` refuses an over-budget model (before touching Redis)."""

from __future__ import annotations

import json

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from lrs_rec.serving.cli import main as cli_main
from lrs_rec.training.private_accounting import PLD_DISCRETIZATION
from lrs_rec.training.private_train import PrivateConfig, fit_private, read_catalogue
from private_ratings import small_ratings

from lrs_rec.model_dir import load_model_dir

RELEASED = {"U", "item_bias", "global_mean", "w_prior_mean", "w_prior_cov"}


def _ratings(seed: int = 0, n_users: int = 80):
    return small_ratings(seed, n_users=n_users, n_items=25, per_user=(3, 12))


def _fit(cfg: PrivateConfig, features: np.ndarray | None = None):
    u, i, r, nu, ni = _ratings()
    return fit_private(
        u, i, r, n_users=nu, n_items=ni, rating_min=1.0, rating_max=5.0, config=cfg,
        item_features=features,
    )  # fmt: skip


@pytest.mark.parametrize("features", ["onehot", "plugin"])
def test_same_seed_same_model_and_different_seed_different_noise(features):
    F = (
        np.random.default_rng(5).integers(0, 2, size=(25, 6)).astype(float)
        if features == "plugin"
        else None
    )
    cfg = PrivateConfig(epsilon=2.0, features=features, rank=2, sparsity=1, random_state=7)
    a, b = _fit(cfg, F), _fit(cfg, F)
    for name in ("item_bias", "user_bias", "w_prior_mean", "w_prior_cov"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(a.lrs.U, b.lrs.U)
    np.testing.assert_array_equal(a.lrs.W, b.lrs.W)
    assert a.global_mean == b.global_mean
    assert a.privacy == b.privacy
    c = _fit(PrivateConfig(epsilon=2.0, features=features, rank=2, sparsity=1, random_state=8), F)
    assert not np.array_equal(a.item_bias, c.item_bias)


def test_every_released_array_is_covered_and_epsilon_meets_the_target():
    fit = _fit(PrivateConfig(epsilon=1.0, rank=2, sparsity=1))
    p = fit.privacy
    assert p is not None
    assert p["epsilon"] <= 1.0 and p["delta"] == 1e-6 and p["neighbouring"] == "add_remove_user"
    covered = {rel for ev in p["events"] for rel in ev["releases"]}
    assert covered == RELEASED  # each data-dependent released array has its own Gaussian events
    listed = p["released_arrays"]
    assert RELEASED | {"item_features", "item_ids"} <= set(listed)
    assert listed["item_features"].startswith("public")
    assert {"W", "B_idx/B_val", "user_bias"} <= set(p["per_user_not_private"])
    names = {ev["name"]: ev for ev in p["events"]}
    assert names["u_step_A"]["count"] == names["u_step_V"]["count"] == 2  # L noisy U-steps


def test_noise_free_pipeline_learns_item_quality_and_private_one_is_noisier():
    u, i, r, nu, ni = _ratings(seed=1, n_users=300)
    kw = {"n_users": nu, "n_items": ni, "rating_min": 1.0, "rating_max": 5.0}
    clean = fit_private(u, i, r, config=PrivateConfig(epsilon=None, rank=2, sparsity=1), **kw)
    # seeded noise: with fresh OS entropy (the default) an unlucky draw can beat the clean fit
    noisy = [
        fit_private(
            u, i, r, config=PrivateConfig(epsilon=0.5, rank=2, sparsity=1, random_state=s), **kw
        )
        for s in (0, 1, 2)
    ]
    assert clean.privacy is None
    item_means = np.bincount(i, r, ni) / np.bincount(i, minlength=ni)
    assert np.corrcoef(clean.item_bias, item_means)[0, 1] > 0.9

    def rmse(f) -> float:
        return float(np.sqrt(np.mean((f.predict(u, i, 1.0, 5.0) - r) ** 2)))

    assert all(rmse(clean) < rmse(f) for f in noisy)


def test_bad_inputs_are_rejected_with_clear_messages():
    with pytest.raises(ValueError, match="epsilon"):
        PrivateConfig(epsilon=-1.0)
    with pytest.raises(ValueError, match="plugin"):
        _fit(PrivateConfig(features="plugin"))
    u, i, r, nu, ni = _ratings()
    with pytest.raises(ValueError, match="duplicate"):
        fit_private(
            np.r_[u, u[:1]], np.r_[i, i[:1]], np.r_[r, r[:1]], n_users=nu, n_items=ni,
            rating_min=1.0, rating_max=5.0, config=PrivateConfig(),
        )  # fmt: skip


def test_catalogue_reader_parses_movielens_100k_items(tmp_path):
    path = tmp_path / "u.item"
    flags = "|".join(["0"] * 18)
    path.write_text(f"1|Toy Story (1995)|01-Jan-1995||http://x|0|{flags}\n2|B|||u|1|{flags}\n")
    cat = read_catalogue(path)
    assert cat.ids == ("1", "2")
    assert cat.genres is not None and cat.genres.shape == (2, 19)
    assert cat.genres[1, 0] == 1.0
    F = cat.features()
    assert F is not None and F.shape == (2, 24)
    assert F[0, 19:].tolist() == [0, 0, 0, 0, 1] and F[1, 19:].tolist() == [0] * 5  # 1995; unknown


def _write_csv(tmp_path):
    u, i, r, _, ni = _ratings()
    csv = tmp_path / "ratings.csv"
    csv.write_text(
        "user,item,rating\n"
        + "".join(f"u{a},i{b},{c:g}\n" for a, b, c in zip(u, i, r, strict=True))
    )
    catalog = tmp_path / "items.txt"
    catalog.write_text(
        "".join(f"i{b}\n" for b in range(ni + 3))
    )  # the catalogue may hold unrated items
    return csv, catalog


def test_cli_train_with_epsilon_writes_a_ledger_recomputable_from_the_manifest(tmp_path, capsys):
    csv, catalog = _write_csv(tmp_path)
    out = tmp_path / "model"
    rc = cli_main([
        "train", "--ratings", str(csv), "--item-catalog", str(catalog), "--epsilon", "1.5",
        "--delta", "1e-6", "--rating-scale", "1", "5", "--dp-rank", "2", "--dp-sparsity", "1", "--out", str(out),
        "--no-export", "--json",
    ])  # fmt: skip
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["epsilon"] <= 1.5
    model = load_model_dir(out)
    privacy = json.loads((out / "manifest.json").read_text())["privacy"]
    assert model.n_items == 28 and model.lrs.d == 28  # one-hot identity over the public catalogue
    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(e["noise_multiplier"]), e["count"]
        )
        for e in privacy["events"]
    ]
    # one-hot features at ε <= 2 default to the PLD accountant (PrivateConfig.for_data)
    assert privacy["accountant"] == "pld"
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    acc.compose(dp_accounting.ComposedDpEvent(events))
    eps = acc.get_epsilon(privacy["delta"])
    assert eps == pytest.approx(privacy["epsilon"], rel=1e-9)
    assert eps <= 1.5
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(dp_accounting.ComposedDpEvent(events))
    assert eps <= rdp.get_epsilon(privacy["delta"])  # PLD is the tighter of the two
    assert privacy["noise_seed"].startswith("fresh OS entropy")


def test_cli_noise_seed_reproduces_and_is_not_written(tmp_path, capsys):
    csv, catalog = _write_csv(tmp_path)
    digests = []
    for run in ("a", "b", "c"):
        seed = "11" if run != "c" else "12"
        out = tmp_path / run
        args = ["train", "--ratings", str(csv), "--item-catalog", str(catalog), "--epsilon", "2",
                "--rating-scale", "1", "5", "--dp-rank", "2", "--dp-sparsity", "1", "--dp-noise-seed", seed, "--out", str(out),
                "--no-export", "--quiet", "--accountant", "rdp"]  # fmt: skip
        assert cli_main(args) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert "FIXED seed" in manifest["privacy"]["noise_seed"]
        assert manifest["hyperparameters"]["random_state"] == "fixed (not recorded)"
        digests.append(manifest["arrays_sha256"])
    assert digests[0] == digests[1] != digests[2]


def test_publish_refuses_an_over_budget_model_before_touching_redis(tmp_path, capsys, monkeypatch):
    csv, catalog = _write_csv(tmp_path)
    out = tmp_path / "model"
    assert cli_main([
        "train", "--ratings", str(csv), "--item-catalog", str(catalog), "--epsilon", "4",
        "--rating-scale", "1", "5", "--dp-rank", "2", "--dp-sparsity", "1", "--out", str(out), "--no-export", "--quiet",
    ]) == 0  # fmt: skip
    capsys.readouterr()
    # an unreachable Redis URL: the refusal must come first
    bad = ["publish", "--model", str(out), "--redis", "redis://127.0.0.1:1/0"]
    assert cli_main([*bad, "--max-epsilon", "1"]) == 2
    err = capsys.readouterr().err
    assert "exceeds the configured budget max ε = 1" in err and "refusing to publish" in err
    monkeypatch.setenv("LRS_MAX_EPSILON", "2")
    assert cli_main(bad) == 2
    assert "max ε = 2" in capsys.readouterr().err


@pytest.mark.ml100k
def test_ml100k_private_model_beats_its_own_population_model(ml100k_dir, tmp_path, capsys):
    """`lrs-rec train --epsilon 1` on u1.base: the public catalogue's 1,682 items and genre + period
    features are used, ε recomputes to ≤ 1, and the personalised predictions on u1.test beat the same
    model's non-personalised population predictions (unknown-user path)."""
    out = tmp_path / "dp"
    args = ["train", "--ratings", str(ml100k_dir / "u1.base"), "--epsilon", "1", "--out", str(out),
            "--no-export", "--quiet", "--dp-noise-seed", "0"]  # fmt: skip
    assert cli_main(args) == 0
    model = load_model_dir(out)
    privacy = model.manifest["privacy"]
    assert model.n_items == 1682 and model.lrs.d == 24
    assert "u.item" in privacy["released_arrays"]["item_ids"]
    assert privacy["released_arrays"]["item_features"].startswith("public: genre flags")
    test = np.loadtxt(ml100k_dir / "u1.test", dtype=np.int64)
    users = np.array([model.user_index().get(str(u), -1) for u in test[:, 0]])
    items = np.array([model.item_index()[str(i)] for i in test[:, 1]])
    truth = test[:, 2].astype(float)
    personal = np.sqrt(np.mean((model.predict(users, items) - truth) ** 2))
    population = np.sqrt(np.mean((model.predict(np.full_like(users, -1), items) - truth) ** 2))
    assert personal < population


@pytest.mark.parametrize("features", ["onehot", "plugin"])
def test_local_user_step_depends_on_each_users_own_ratings_only(features):
    """The trainer's per-user step (c_u, w_u, b_u) from the released U: removing one user must not
    move any other user's parameters (the billboard argument behind the stated sensitivities)."""
    import lrs_rec.training.private_train as T

    rng = np.random.default_rng(1)
    n_users, n_items, r, k = 30, 25, 3, 2
    pairs = sorted(
        {
            (u, int(i))
            for u in range(n_users)
            for i in rng.choice(n_items, rng.integers(2, 20), False)
        }
    )
    users, items = (np.array(col) for col in zip(*pairs, strict=True))
    t = rng.standard_normal(len(users)) * 2
    cfg = PrivateConfig(features=features, sparsity=k, rank=r)
    F = None if features == "onehot" else rng.random((n_items, 6))
    U = np.linalg.qr(rng.standard_normal((n_items if F is None else 6, r)))[0]

    def start(n):
        return T._Local(
            np.zeros(n), np.zeros((n, r)), np.tile(np.arange(k), (n, 1)), np.zeros((n, k))
        )

    a = T.local_user_step(cfg, F, U, users, items, t, n_users, start(n_users))
    keep = users != 0
    b = T.local_user_step(
        cfg, F, U, users[keep] - 1, items[keep], t[keep], n_users - 1, start(n_users - 1)
    )
    np.testing.assert_array_equal(a.B_idx[1:], b.B_idx)
    np.testing.assert_allclose(a.W[1:], b.W, rtol=0, atol=1e-12)
    np.testing.assert_allclose(a.user_bias[1:], b.user_bias, rtol=0, atol=1e-12)
    np.testing.assert_allclose(a.B_val[1:], b.B_val, rtol=0, atol=1e-12)


def test_ledger_names_where_the_item_features_came_from(tmp_path, capsys):
    """Genre features from a MovieLens catalogue and plug-in features from a file are both passed
    to the private fit as 'plugin' features; the ledger must still say which one was released
    (``features_source``, and the released array's provenance)."""
    csv, catalog = _write_csv(tmp_path)
    ids = [line for line in catalog.read_text().splitlines() if line]
    flags = "|".join(["0"] * 18)
    u_item = tmp_path / "u.item"
    u_item.write_text("".join(f"{s}|T {s} (1995)|01-Jan-1995||http://x|1|{flags}\n" for s in ids))
    feats = tmp_path / "feats.npy"
    np.save(feats, np.arange(3 * len(ids), dtype=float).reshape(-1, 3) % 5)
    (tmp_path / "feats.ids.txt").write_text("".join(f"{s}\n" for s in ids))
    common = ["train", "--ratings", str(csv), "--epsilon", "2", "--rating-scale", "1", "5", "--dp-rank", "2",
              "--dp-sparsity", "1", "--no-export", "--quiet"]  # fmt: skip
    described = {}
    for name, extra in {
        "genres": ["--item-catalog", str(u_item)],
        "plugin": ["--item-catalog", str(u_item), "--item-features", str(feats)],
    }.items():
        out = tmp_path / name
        assert cli_main([*common, *extra, "--out", str(out)]) == 0
        privacy = json.loads((out / "manifest.json").read_text())["privacy"]
        described[name] = privacy["released_arrays"]["item_features"]
        assert privacy["features"] == "plugin" and privacy["features_source"] == name
    capsys.readouterr()
    assert (
        described["genres"].startswith("public: genre flags") and str(u_item) in described["genres"]
    )
    assert described["plugin"].startswith("public: plug-in item features from " + str(feats))


def test_private_training_refuses_a_rating_scale_read_off_the_ratings(tmp_path, capsys):
    """The rating scale is released (model.onnx Clip bounds and metadata, GET /v1/model) and centres
    the private global mean: on a generic file its default, the observed min/max of the ratings,
    would release one user's most extreme rating exactly. Private training needs it declared."""
    csv, catalog = _write_csv(tmp_path)
    common = ["train", "--ratings", str(csv), "--item-catalog", str(catalog), "--epsilon", "2",
              "--dp-rank", "2", "--dp-sparsity", "1", "--no-export", "--quiet"]  # fmt: skip
    assert cli_main([*common, "--out", str(tmp_path / "refused")]) != 0
    assert "--rating-scale" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "declared"
    assert cli_main([*common, "--rating-scale", "1", "5", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rating_scale"] == [1.0, 5.0]
    assert manifest["privacy"]["released_arrays"]["rating_scale"].startswith("public: declared")


def test_population_gram_mode_covers_every_release_and_epsilon_recomputes_from_the_ledger():
    from lrs_rec.training.private_accounting import recompute_epsilon
    from lrs_rec.training.private_train import POPULATION_SHARES

    u, i, r, nu, ni = _ratings()
    cfg = PrivateConfig.for_data(u, n_items=ni, epsilon=1.0, random_state=3)
    assert cfg.u_step_gram == "population" and cfg.sparsity == 0
    fit = fit_private(
        u, i, r, n_users=nu, n_items=ni, rating_min=1.0, rating_max=5.0, config=cfg
    )  # fmt: skip
    p = fit.privacy
    assert p is not None
    events = {e["name"]: e for e in p["events"]}
    assert set(events) == set(POPULATION_SHARES) | {"u_init"}  # + the spectral start of U
    assert events["u_step_V"]["count"] == events["u_step_M"]["count"] == cfg.n_iters
    assert events["u_step_count"]["count"] == events["u_init"]["count"] == 1
    assert {rel for ev in p["events"] for rel in ev["releases"]} == RELEASED
    eps = recompute_epsilon(p)
    assert eps == pytest.approx(p["epsilon"], rel=1e-9)
    assert 0.99 <= eps <= 1.0  # calibrated to the target, never above it
    assert fit.item_features is None and fit.lrs.d == ni  # one-hot: the identity is not stored
    pred = fit.predict(u, i, 1.0, 5.0)
    assert np.all(np.isfinite(pred)) and pred.min() >= 1.0 and pred.max() <= 5.0


def test_defaults_for_the_data_size_follow_the_stated_rule():
    small = PrivateConfig.for_data(np.arange(943), n_items=1682, epsilon=1.0)
    assert (small.rank, small.n_iters, small.max_samples_per_user) == (2, 3, 20)
    big = PrivateConfig.for_data(np.arange(1_000_000), n_items=20_000, epsilon=1.0)
    assert (big.rank, big.n_iters, big.u_step_gram, big.sparsity) == (8, 3, "population", 0)
    assert (big.u_init, big.u_solve, big.u_select) == ("spectral", "posterior", "weighted")
    assert (big.u_carry, big.u_item_snr, big.accountant) == (True, 4.0, "pld")
    loose = PrivateConfig.for_data(np.arange(50), n_items=10, epsilon=8.0)
    assert loose.accountant == "rdp"  # PLD's calibration grows with ε: RDP above PLD_UP_TO
    plug = PrivateConfig.for_data(np.arange(50), n_items=10, epsilon=1.0, features="plugin")
    assert plug.u_step_gram == "blocks" and plug.rank == PrivateConfig().rank
    with pytest.raises(ValueError, match="one-hot"):
        PrivateConfig(features="plugin", u_step_gram="population")
    with pytest.raises(ValueError, match="one-hot"):
        PrivateConfig(features="plugin", u_init="spectral")
    for bad in ({"u_solve": "exact"}, {"u_select": "all"}, {"u_user_norm": 0.0},
                {"spectral_items": 0}, {"u_prior_scale": -1.0}, {"u_item_snr": -1.0},
                {"u_item_snr": 1.0}, {"u_carry": True}, {"u_drift": float("nan")}):  # fmt: skip
        with pytest.raises(ValueError):
            PrivateConfig(**bad)


def test_cli_population_gram_writes_its_events_and_a_recomputable_ledger(tmp_path, capsys):
    from lrs_rec.training.private_accounting import recompute_epsilon

    csv, catalog = _write_csv(tmp_path)
    out = tmp_path / "pop"
    assert cli_main([
        "train", "--ratings", str(csv), "--item-catalog", str(catalog), "--epsilon", "1",
        "--rating-scale", "1", "5", "--dp-rank", "2", "--dp-sparsity", "0",
        "--dp-u-step-gram", "population", "--out", str(out), "--no-export", "--quiet",
    ]) == 0  # fmt: skip
    privacy = json.loads((out / "manifest.json").read_text())["privacy"]
    assert privacy["u_step_gram"] == "population"
    assert {e["name"] for e in privacy["events"]} >= {"u_step_V", "u_step_M", "u_step_count"}
    assert recompute_epsilon(privacy) == pytest.approx(privacy["epsilon"], rel=1e-9)
    assert privacy["epsilon"] <= 1.0
    assert load_model_dir(out).lrs.sparsity == 0


def test_one_hot_model_is_stored_factored_with_the_same_predictions(tmp_path, capsys):
    """One-hot features without a sparse part: the model directory holds item features U
    (n_items × r) and U = I_r — no n_items × n_items identity — and predicts exactly as the fit."""
    u, i, r, nu, ni = _ratings()
    cfg = PrivateConfig.for_data(u, n_items=ni, epsilon=2.0, random_state=5)
    fit = fit_private(
        u, i, r, n_users=nu, n_items=ni, rating_min=1.0, rating_max=5.0, config=cfg
    )  # fmt: skip
    lrs, F = fit.stored_factors()
    assert F.shape == (ni, cfg.rank) and np.array_equal(lrs.U, np.eye(cfg.rank))
    theta = lrs.W[u] @ lrs.U.T
    pred = np.clip(
        fit.global_mean + fit.user_bias[u] + fit.item_bias[i] + np.einsum("nd,nd->n", F[i], theta),
        1.0, 5.0,
    )  # fmt: skip
    np.testing.assert_allclose(pred, fit.predict(u, i, 1.0, 5.0), atol=1e-12)
    # through the CLI: the written model directory is the factored one and loads
    csv, catalog = _write_csv(tmp_path)
    out = tmp_path / "factored"
    assert cli_main([
        "train", "--ratings", str(csv), "--item-catalog", str(catalog), "--epsilon", "1",
        "--rating-scale", "1", "5", "--out", str(out), "--no-export", "--quiet",
    ]) == 0  # fmt: skip
    model = load_model_dir(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert model.lrs.sparsity == 0 and model.lrs.d == model.lrs.rank
    assert model.item_features.shape == (model.n_items, model.lrs.rank)
    assert manifest["privacy"]["released_arrays"]["item_features"].startswith(
        "private: the one-hot model's U"
    )
    assert np.all(np.isfinite(model.predict(np.zeros(3, np.int64), np.arange(3))))


@pytest.mark.parametrize("n_items", [1, 5])
def test_one_hot_default_rank_never_exceeds_a_small_catalogue(tmp_path, capsys, n_items):
    # 300 users over fewer than 8 items: ρ / 6 asks for r = 8, but one-hot features have d = n_items
    # (this was "rank 8 and sparsity 0 must not exceed d=5", naming no flag the user had given)
    cfg = PrivateConfig.for_data(np.arange(300), n_items=n_items, epsilon=1.0)
    assert cfg.rank == n_items
    rng = np.random.default_rng(0)
    csv = tmp_path / "few.csv"
    lines = ["user,item,rating"]
    for u in range(300):
        for i in rng.choice(n_items, size=min(3, n_items), replace=False):
            lines.append(f"u{u},i{i},{int(rng.integers(1, 6))}")
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "model"
    rc = cli_main([
        "train", "--ratings", str(csv), "--epsilon", "1", "--rating-scale", "1", "5",
        "--out", str(out), "--no-export", "--quiet",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    model = load_model_dir(out)
    assert (
        model.n_items == n_items
        and model.lrs.d == n_items
        and model.lrs.U.shape == (n_items, n_items)
    )
    pred = model.predict(np.arange(10), np.zeros(10, dtype=np.int64))
    assert np.all(np.isfinite(pred)) and pred.min() >= 1.0 and pred.max() <= 5.0
    # a rank the user asks for beyond d is still an error, now naming the flags
    rc = cli_main([
        "train", "--ratings", str(csv), "--epsilon", "1", "--rating-scale", "1", "5",
        "--dp-rank", str(n_items + 1), "--out", str(tmp_path / "m2"), "--no-export", "--quiet",
    ])  # fmt: skip
    assert rc == 2
    assert capsys.readouterr().err.endswith(
        f"must not exceed d={n_items} (--dp-rank, --dp-sparsity; d is the number of items with "
        "one-hot features)\n"
    )
