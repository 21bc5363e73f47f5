"""Calibration where users live: a few hundred controls, D up to 200, many small sites. One table.

Synthetic cohorts with exact truth: ``SyntheticCohort(site_sizes="zipf", site_effect=3)``, 20 sites of
Zipf-like sizes (the smallest of 3 to 10 people at N=200 to 500) with per-site, per-IDP location and
scale effects of a fraction of an SD; 600 held-out people. Real data: fcon1000 (``--real``), the same
70/30 within-site split as ``benchmarks/peers.py``, small and full IDP sets.

Rows per cohort:
- ``ours``: the default model (two-stage, with the calibration layer), and the same fit with the layer
  switched off (no refit: the layer is applied at scoring time);
- ``ours, joint_folds=0`` (``--methods ours-nofolds``): the default model without the fold models that
  learn the joint map where the validation rows are too few to check it (the map of earlier versions;
  the same as ``ours`` elsewhere); ``ours, joint_folds=5`` (``--methods ours-folds``): fold models
  wherever the cohort is;
- ``ours, 3 networks`` (``--methods ours-3``): the same with ``n_networks=3``, the draws of three
  networks pooled;
- ``ours, site embedding``: the earlier design (diffusion on the IDPs, site as a learned embedding;
  ``location_scale="off"``), with ``--legacy``;
- peers: the per-IDP Gaussian spline baseline, PCNtoolkit BLR and BLR + SHASH warp (one BLAS thread);
- ``site oracle`` (synthetic only): the generator's exact population functions, and each site's
  effects estimated from its training people with empirical-Bayes shrinkage: the achievable floor.

Columns: mean |centile - truth| (synthetic), its Monte Carlo floor for the draws used, |cov95 - 0.95|,
PIT-KS, the worst site's |cov95 - 0.95| among sites with >= 15 test people, the held-out joint
deviation's KS distance to U(0, 1) and its shares above 0.95 and 0.99 (nominal 0.05, 0.01), fit and
score seconds. Under each cohort, the floors: the Monte Carlo floor of |centile - truth| for the draws
used, and the joint KS that an exact conformal map learnt from the cohort's training controls gives on
its test people (median and 95th centile over draws of the controls): a map learnt from a few hundred
controls cannot be held to a KS below its own sampling error.

    python benchmarks/regimes.py --quick                 # N=500, D=100 and N=200, D=20 (~10 min)
    python benchmarks/regimes.py                         # the whole grid (hours on 2 cores)
    python benchmarks/regimes.py --cells 500x100 --real ../shared/reference/fcon1000/fcon1000.csv
    python benchmarks/regimes.py --cells --real fcon1000.csv --idp-sets small --split-seeds 0 1 2 3 \
        --methods ours,pcn-blr-shash                     # four splits and their mean (one split is noisy)
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402
from peers import COVARIATES, Dataset  # noqa: E402

from normdiff_bids.evaluation import centile_error, empirical_coverage, pit_summary  # noqa: E402

GRID = [(n, d) for n in (200, 500, 1000, 3000) for d in (20, 100, 200)]
QUICK = [(500, 100), (200, 20)]
N_TEST = 600
N_SITES = 20
SITE_EFFECT = 3.0
MIN_SITE_TEST = 15


def synthetic(n_train: int, n_idps: int, seed: int = 0) -> tuple[Dataset, object]:
    from normdiff_bids.data.synthetic import SyntheticCohort

    gen = SyntheticCohort(n_idps=n_idps, n_sites=N_SITES, seed=seed, site_sizes="zipf",
                          site_effect=SITE_EFFECT)
    train, test = gen.sample(n_train, seed=seed + 1), gen.sample(N_TEST, seed=seed + 2)
    test = test[test["site"].isin(set(train["site"]))].reset_index(drop=True)  # every test site trained
    sizes = train["site"].value_counts()
    name = f"synthetic N={n_train} D={n_idps}"
    notes = [f"SyntheticCohort(n_idps={n_idps}, n_sites={N_SITES}, site_sizes='zipf', "
             f"site_effect={SITE_EFFECT}, seed={seed}); {len(test)} test people; training site sizes "
             f"{sizes.max()} to {sizes.min()}"]
    return Dataset(name, train, test, list(gen.idps), truth=gen.cdf(test), notes=notes), gen


def site_oracle_centiles(gen, train: pd.DataFrame, test: pd.DataFrame) -> np.ndarray:
    """Centiles under the true population functions, with each site's shift and spread of the normal
    scores estimated from its training people and shrunk by empirical Bayes across sites."""
    population = copy.deepcopy(gen)
    population._site_loc = np.zeros_like(gen._site_loc)
    population._site_scale = np.zeros_like(gen._site_scale)
    z_train = population.normal_scores(train).to_numpy()
    z_test = population.normal_scores(test).to_numpy()
    sites = sorted(train["site"].unique())
    counts = np.array([(train["site"] == s).sum() for s in sites])
    means = np.stack([z_train[(train["site"] == s).to_numpy()].mean(axis=0) for s in sites])
    tau2 = np.maximum(means.var(axis=0) - np.mean(1 / counts), 1e-4)
    big = counts > 2
    logvar = np.stack([np.log(z_train[(train["site"] == s).to_numpy()].var(axis=0, ddof=1) + 1e-9)
                       if n > 2 else np.zeros(z_train.shape[1]) for s, n in zip(sites, counts)])
    omega2 = np.maximum(logvar[big].var(axis=0) - np.mean(2 / (counts[big] - 1)), 1e-4)
    out = np.full(z_test.shape, np.nan)
    for k, site in enumerate(sites):
        rows = (test["site"] == site).to_numpy()
        shift = counts[k] / (counts[k] + 1 / tau2) * means[k]
        dof = (counts[k] - 1) / 2
        log_v = dof / (dof + 1 / omega2) * logvar[k] if counts[k] > 2 else 0.0
        out[rows] = stats.norm.cdf((z_test[rows] - shift) / np.exp(log_v / 2))
    return out


def mc_floor(n_samples: int) -> float:
    """Mean |centile - truth| of a perfect model scored with ``n_samples`` draws:
    E|ECDF_S(u) - u| ~ sqrt(2 u (1 - u) / (pi S)), averaged over u ~ U(0, 1)."""
    u = np.linspace(0.0005, 0.9995, 2000)
    return float(np.mean(np.sqrt(2 * u * (1 - u) / (np.pi * n_samples))))


def joint_ks_floor(n_controls: int, n_test: int, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Median and 95th centile of the held-out joint KS of an exact conformal map: every test person's
    centile is its rank among ``n_controls`` exchangeable controls' statistics (ties broken at random),
    so the test centiles are uniform over draws of the controls but follow the controls' own empirical
    CDF given them. A map learnt from that many controls without a parametric form (such as the
    calibration layer's quantile-knot map) does no better on ``n_test`` people in the typical fit (at 200
    controls and 600 test people: median 0.066, one fit in four above 0.08)."""
    rng = np.random.default_rng(seed)
    ks = np.empty(reps)
    ranks = np.arange(1, n_test + 1)
    for rep in range(reps):
        controls = np.sort(rng.random(n_controls))
        test = (np.searchsorted(controls, rng.random(n_test)) + rng.random(n_test)) / (n_controls + 1)
        test.sort()
        ks[rep] = max((ranks / n_test - test).max(), (test - (ranks - 1) / n_test).max())
    return float(np.median(ks)), float(np.quantile(ks, 0.95))


def metrics(data: Dataset, centiles: np.ndarray, joint: np.ndarray | None) -> dict:
    centiles = pd.DataFrame(centiles, index=data.test.index, columns=data.idps)
    row = {
        "|c-truth|": (centile_error(centiles, data.truth)["mean_abs_error"] if data.truth is not None
                      else None),
        "|cov95-.95|": empirical_coverage(centiles)["abs_error"],
        "PIT-KS": pit_summary(centiles)["ks"],
    }
    worst = [empirical_coverage(centiles.iloc[rows])["abs_error"]
             for rows in data.test.groupby("site").indices.values() if len(rows) >= MIN_SITE_TEST]
    row["worst site"] = max(worst) if worst else None
    if joint is not None:
        j = np.asarray(joint, dtype=float)
        j = j[np.isfinite(j)]
        row["joint KS"] = float(stats.kstest(j, "uniform").statistic)
        row[">.95"] = float(np.mean(j > 0.95))
        row[">.99"] = float(np.mean(j > 0.99))
    return row


def run_ours(data: Dataset, args, **params) -> list[tuple[str, dict]]:
    from normdiff_bids import NormativeDiffusion

    model = NormativeDiffusion(covariates=COVARIATES, seed=args.seed, n_samples=args.n_samples,
                               verbose=False, **params)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(data.train[[*COVARIATES, *data.idps]], idps=data.idps)
    fit_s = time.perf_counter() - start
    label = "ours" if params.get("location_scale", "pooled") != "off" else "ours, site embedding"
    if params.get("joint_folds", "auto") != "auto":
        label = f"ours, joint_folds={params['joint_folds']}"
    if params.get("n_networks", 1) > 1:
        label = f"ours, {params['n_networks']} networks"
    rows = []
    test = data.test
    if "participant_id" not in test.columns:  # fcon1000 names its people sub_id
        test = test.assign(participant_id=[f"row{i}" for i in range(len(test))])
    settings = ["conformal", "off"] if getattr(model, "calibration_", None) is not None else ["off"]
    for calibration in settings:
        model.set_params(calibration=calibration)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = model.score(test[["participant_id", *COVARIATES, *data.idps]])
        score_s = time.perf_counter() - start
        wide = scores.pivot(index="participant_id", columns="idp", values="centile")
        wide = wide.loc[test["participant_id"], data.idps].to_numpy()
        joint = scores.groupby("participant_id", sort=False)["joint_centile"].first()
        joint = joint.loc[test["participant_id"]].to_numpy()
        row = metrics(data, wide, joint)
        row.update({"fit s": fit_s, "score s": score_s})
        rows.append((label if calibration == "conformal" or len(settings) == 1
                     else f"{label}, no calibration layer", row))
    return rows


def run_peer(method: str, data: Dataset, args) -> tuple[str, dict]:
    try:
        if method == "gauss-spline":
            model, fit_s = peers.fit_baseline(data, args)
            start = time.perf_counter()
            centiles = model.predict_centiles(data.test).to_numpy()
            score_s = time.perf_counter() - start
        else:
            model, fit_s, score_s = peers.run_pcntoolkit(data, "WarpSinhArcsinh" if method == "pcn-blr-shash"
                                                         else None, args)
            centiles = model.centiles
        row = metrics(data, centiles, None)
        row.update({"fit s": fit_s, "score s": score_s})
    except Exception as err:  # a peer that cannot run keeps its row, with the reason
        row = {"note": f"{type(err).__name__}: {err}"}
    return peers.LABELS[method], row


COLUMNS = ["|c-truth|", "|cov95-.95|", "PIT-KS", "worst site", "joint KS", ">.95", ">.99", "fit s",
           "score s"]


def split_means(results, sets, splits) -> list:
    """One entry per real IDP set: each method's metrics averaged over the splits ``splits``.

    ``sets[i]`` names the IDP set whose split ``results[i]`` is (``None``: a synthetic cohort)."""
    groups: dict[str, list] = {}
    for (_, rows, _), base in zip(results, sets):
        if base is not None:
            groups.setdefault(base, []).append(rows)
    out = []
    for base, runs in groups.items():
        means = []
        by_name = [dict(rows) for rows in runs]
        for name, _ in runs[0]:
            found = [rows[name] for rows in by_name if name in rows and "note" not in rows[name]]
            if found:
                means.append((name, {col: float(np.mean([r[col] for r in found])) for col in COLUMNS
                                     if all(r.get(col) is not None for r in found)}))
        label = f"{base}, mean of splits {', '.join(map(str, splits))}"
        out.append((peers.Dataset(label, None, None, []), means, float("nan")))
    return out


def format_table(results: list[tuple[Dataset, list[tuple[str, dict]], float]]) -> str:
    lines = ["| cohort | method | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    for data, rows, floor in results:
        for name, row in rows:
            if "note" in row:
                lines.append(f"| {data.name} | {name} | {row['note']} |" + " |" * (len(COLUMNS) - 1))
                continue
            cells = []
            for col in COLUMNS:
                value = row.get(col)
                if value is None:
                    cells.append("")
                else:
                    cells.append(f"{value:.0f}" if col.endswith(" s") else f"{value:.4f}")
            lines.append(f"| {data.name} | {name} | " + " | ".join(cells) + " |")
        if data.truth is not None:
            lines.append(f"| {data.name} | (Monte Carlo floor of |c-truth|) | {floor:.4f} |"
                         + " |" * (len(COLUMNS) - 1))
        if data.train is not None and any("joint KS" in row for _, row in rows):
            median, q95 = joint_ks_floor(len(data.train), len(data.test))
            at = COLUMNS.index("joint KS")
            lines.append(f"| {data.name} | (joint KS of an exact conformal map from the "
                         f"{len(data.train)} controls: median, 95%) |" + " |" * at
                         + f" {median:.3f}, {q95:.3f} |" + " |" * (len(COLUMNS) - at - 1))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N=500, D=100 and N=200, D=20 only")
    p.add_argument("--cells", nargs="*", default=None, help="NxD cells, e.g. 500x100 1000x20")
    p.add_argument("--real", type=Path, default=None, help="fcon1000.csv: add the real-data rows")
    p.add_argument("--idp-sets", nargs="*", default=["small", "full"])
    p.add_argument("--split-seeds", nargs="+", type=int, default=None,
                   help="real data: the 70/30 splits to run (default: --seed); with several, each "
                        "split's rows and then their mean (the model's seed stays --seed)")
    p.add_argument("--methods", default="ours,gauss-spline,pcn-blr,pcn-blr-shash,oracle",
                   help="comma list of ours, ours-nofolds / ours-folds (joint_folds=0 / 5: no fold models "
                        "for the joint map / always five), ours-3 (three networks), legacy, gauss-spline, "
                        "pcn-blr, pcn-blr-shash, oracle")
    p.add_argument("--n-samples", type=int, default=1000, help="our draws per covariate point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pcn-python", default=os.environ.get("NORMDIFF_PCN_PYTHON", sys.executable))
    p.add_argument("--pcn-timeout", type=float, default=3600)
    args = p.parse_args(argv)
    # what peers.run_pcntoolkit / fit_baseline read
    args.n_samples_pcn = 200
    args.pcn_iter = 200
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")  # PCNtoolkit's L-BFGS thrashes with more BLAS threads
    methods = args.methods.split(",")
    cells = ([tuple(int(v) for v in c.split("x")) for c in args.cells] if args.cells is not None
             else QUICK if args.quick else GRID)
    datasets = [(*synthetic(n, d, args.seed), None) for n, d in cells]  # (data, generator, real set)
    splits = args.split_seeds or [args.seed]
    if args.real is not None:
        for idp_set in args.idp_sets:
            for split in splits:
                data = peers.real_dataset(args.real, idp_set, split)
                base = data.name
                if len(splits) > 1:
                    data.name = f"{data.name}, split {split}"
                datasets.append((data, None, base))
    results = []
    for data, gen, _ in datasets:
        print(f"# {data.name}: " + "; ".join(data.notes), file=sys.stderr, flush=True)
        rows = []
        pcn_args = argparse.Namespace(**{**vars(args), "n_samples": args.n_samples_pcn})
        if "ours" in methods:
            rows += run_ours(data, args)
        if "ours-nofolds" in methods:
            rows += run_ours(data, args, joint_folds=0)
        if "ours-folds" in methods:
            rows += run_ours(data, args, joint_folds=5)
        if "ours-3" in methods:
            rows += run_ours(data, args, n_networks=3)
        if "legacy" in methods:
            rows += run_ours(data, args, location_scale="off", calibration="off")
        for method in ("gauss-spline", "pcn-blr", "pcn-blr-shash"):
            if method in methods:
                rows.append(run_peer(method, data, pcn_args))
        if "oracle" in methods and gen is not None:
            oracle = site_oracle_centiles(gen, data.train, data.test)
            rows.append(("site oracle", metrics(data, oracle, None)))
        for name, row in rows:
            print(f"  {name}: {row}", file=sys.stderr, flush=True)
        results.append((data, rows, mc_floor(args.n_samples)))
    if len(splits) > 1:
        results += split_means(results, [base for _, _, base in datasets], splits)
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
