"""Conditional deviations (an IDP given others) and the joint deviation with missing IDPs, against the
exact truth of the synthetic generator. Prints one table.

    python benchmarks/conditional.py            # D=20 and D=100, N_train=6000, 1000 held-out subjects
    python benchmarks/conditional.py --quick    # D=20, N_train=1500, 500 held-out subjects

The generator ties its IDPs by a Gaussian copula with correlation R, so with ``z = Phi^-1(true
centiles)`` the exact centile of IDP j given the set G is ``Phi((z_j - mu_{j|G}) / sigma_{j|G})``
(``mu = R_jG R_GG^-1 z_G``, ``sigma^2 = 1 - R_jG R_GG^-1 R_Gj``).

Rows: ``given`` = 1 IDP, 5 IDPs, all but one; ``missing`` = 10% / 30% of IDPs missing at random.
``--training``: instead, training rows with 10% / 30% of IDPs missing at random, fitted with
``missing_idps="use"`` (train on what each row has) and ``"drop"`` (complete rows only), against the
same cohort without holes; ``mean_abs_err`` is then the held-out marginal |centile - truth|.
Columns: ``mean_abs_err`` = mean |conditional centile - truth| over held-out subjects and target IDPs;
``cov95_err`` = |share of held-out values inside their conditional central 95% - 0.95|; ``joint_ks`` =
KS distance to uniform of the held-out controls' joint centiles (missing rows: over the IDPs present);
``floor`` = the same statistic for the same method fed the true normal scores and draws from the true
copula (what Monte Carlo alone costs); ``s_per_1000`` = seconds per 1000 subjects.
Targets (D=20, N_train=6000, given 1 or 5): mean_abs_err <= 0.03, cov95_err <= 0.02; 30% missing:
joint_ks <= 0.06.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import pandas as pd
from scipy.special import ndtr
from scipy.stats import kstest

from normdiff_bids.data.synthetic import SyntheticCohort
from normdiff_bids.errors import InputError
from normdiff_bids.scoring.conditional import PointDraws, conditional_centiles

TARGETS = {"mean_abs_err": 0.03, "cov95_err": 0.02, "joint_ks_30": 0.06}


def true_conditional(z: np.ndarray, corr: np.ndarray, given: list[int], targets: list[int]) -> np.ndarray:
    """Exact conditional centiles ``[R, T]`` of a Gaussian copula with correlation ``corr``."""
    r_gg = corr[np.ix_(given, given)]
    r_tg = corr[np.ix_(targets, given)]
    coef = np.linalg.solve(r_gg, r_tg.T).T                     # [T, G]
    mu = z[:, given] @ coef.T
    sigma = np.sqrt(1.0 - np.sum(coef * r_tg, axis=1))
    return ndtr((z[:, targets] - mu) / sigma)


def oracle_conditional(z: np.ndarray, corr: np.ndarray, given, targets, n_samples: int, seed: int):
    """The method fed the truth: one set of draws from the true copula, the subjects' true scores."""
    rng = np.random.default_rng(seed)
    draws = rng.standard_normal((n_samples, corr.shape[0])) @ np.linalg.cholesky(corr).T
    return conditional_centiles(z, PointDraws(draws), tuple(given), tuple(targets))


def given_sets(d: int) -> list[tuple[str, list[int]]]:
    return [("given 1", [0]), ("given 5", list(range(5))), ("all but one", list(range(d - 1)))]


def run(d: int, args) -> list[dict]:
    from normdiff_bids import NormativeDiffusion

    cohort = SyntheticCohort(n_idps=d, n_sites=3, seed=args.seed)
    train = cohort.sample(args.n_train, seed=args.seed + 1)
    test = cohort.sample(args.n_test, seed=args.seed + 2)
    start = time.perf_counter()
    model = NormativeDiffusion(seed=args.seed, n_samples=args.n_samples, verbose=False).fit(train)
    fit_s = time.perf_counter() - start
    z_true = cohort.normal_scores(test).to_numpy()
    corr = cohort.correlation
    rows = []
    for label, given in given_sets(d):
        targets = [j for j in range(d) if j not in given]
        names = [cohort.idps[j] for j in given]
        start = time.perf_counter()
        ours = model.predict_centiles(test, given=names).to_numpy()
        seconds = time.perf_counter() - start
        truth = true_conditional(z_true, corr, given, targets)
        floor = oracle_conditional(z_true, corr, given, targets, args.n_samples, args.seed)
        inside = (ours > 0.025) & (ours < 0.975)
        rows.append({"D": d, "case": label, "mean_abs_err": np.abs(ours - truth).mean(),
                     "floor": np.abs(floor - truth).mean(), "cov95_err": abs(inside.mean() - 0.95),
                     "joint_ks": np.nan, "s_per_1000": 1000 * seconds / len(test), "fit_s": fit_s})
    start = time.perf_counter()
    complete = model.score(test).drop_duplicates("participant_id")["joint_centile"].to_numpy()
    seconds = time.perf_counter() - start
    rows.append({"D": d, "case": "no IDP missing", "mean_abs_err": np.nan, "floor": np.nan,
                 "cov95_err": np.nan, "joint_ks": kstest(complete, "uniform").statistic,
                 "s_per_1000": 1000 * seconds / len(test), "fit_s": fit_s})
    rng = np.random.default_rng(args.seed + 3)
    for share in (0.1, 0.3):
        holed = test.copy()
        values = holed[cohort.idps].to_numpy(dtype=float, copy=True)
        values[rng.random(values.shape) < share] = np.nan
        holed[cohort.idps] = values
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = model.score(holed).drop_duplicates("participant_id")
        seconds = time.perf_counter() - start
        centiles = scores["joint_centile"].to_numpy()
        centiles = centiles[np.isfinite(centiles)]
        rows.append({"D": d, "case": f"{int(share * 100)}% missing", "mean_abs_err": np.nan, "floor": np.nan,
                     "cov95_err": np.nan, "joint_ks": kstest(centiles, "uniform").statistic,
                     "s_per_1000": 1000 * seconds / len(test), "fit_s": fit_s})
    return rows


def run_training(d: int, args) -> list[dict]:
    """Training with missing IDPs: held-out marginal and joint calibration, complete test rows."""
    from normdiff_bids import NormativeDiffusion

    cohort = SyntheticCohort(n_idps=d, n_sites=3, seed=args.seed)
    train = cohort.sample(args.n_train, seed=args.seed + 1)
    test = cohort.sample(args.n_test, seed=args.seed + 2)
    truth = cohort.cdf(test).to_numpy()
    rng = np.random.default_rng(args.seed + 4)
    holes = rng.random((len(train), d))
    rows = []
    for share, mode in ((0.0, "use"), (0.1, "use"), (0.1, "drop"), (0.3, "use"), (0.3, "drop")):
        table = train.copy()
        values = table[cohort.idps].to_numpy(dtype=float, copy=True)
        values[holes < share] = np.nan
        table[cohort.idps] = values
        start = time.perf_counter()
        complete = int(np.isfinite(values).all(axis=1).sum())
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = NormativeDiffusion(seed=args.seed, n_samples=args.n_samples, missing_idps=mode,
                                           verbose=False).fit(table)
        except InputError:
            rows.append({"D": d, "case": f"train {int(share * 100)}% missing, {mode} ({complete} complete "
                                         f"rows: cannot fit)"})
            continue
        fit_s = time.perf_counter() - start
        scores = model.score(test)
        centiles = scores["centile"].to_numpy().reshape(len(test), -1)
        joint = scores["joint_centile"].to_numpy().reshape(len(test), -1)[:, 0]
        inside = (centiles > 0.025) & (centiles < 0.975)
        used = len(table) - model.n_dropped_
        rows.append({"D": d, "case": f"train {int(share * 100)}% missing, {mode} ({used} rows)",
                     "mean_abs_err": np.abs(centiles - truth).mean(), "floor": np.nan,
                     "cov95_err": abs(inside.mean() - 0.95), "joint_ks": kstest(joint, "uniform").statistic,
                     "s_per_1000": np.nan, "fit_s": fit_s})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="D=20, N_train=1500, 500 test subjects")
    parser.add_argument("--dims", type=int, nargs="+", default=None)
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--n-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--training", action="store_true",
                        help="training with missing IDPs (use vs drop) instead of scoring rows")
    args = parser.parse_args(argv)
    args.dims = args.dims or ([20] if args.quick else [20, 100])
    args.n_train = args.n_train or (1500 if args.quick else 6000)
    args.n_test = args.n_test or (500 if args.quick else 1000)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    runner = run_training if args.training else run
    rows = [row for d in args.dims for row in runner(d, args)]
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"N_train={args.n_train}, N_test={args.n_test}, n_samples={args.n_samples}; targets: {TARGETS}")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
