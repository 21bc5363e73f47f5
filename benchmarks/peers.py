"""Side-by-side benchmark of normdiff-bids against the tools people would otherwise pick.

Methods: our diffusion model with the FiLM-MLP and the SAINT backbone, PCNtoolkit's Bayesian linear
regression (BLR, with and without its sinh-arcsinh warp) and a per-IDP Gaussian spline baseline.

Synthetic cohorts (ground truth known): D=4 and D=20 IDPs, 3 sites, N_train=6000, 1000 test people,
fixed seeds. Real data (``--real fcon1000.csv``): 70/30 split stratified by site with a fixed seed, a
small IDP set (10 aseg volumes + eTIV) and the full set (about 215 IDPs); covariates age, sex, site.
One table per run: rows are methods, columns the evaluation metrics, fit and score seconds.

    python benchmarks/peers.py --quick
    python benchmarks/peers.py --real ../shared/reference/fcon1000/fcon1000.csv --idp-set small

PCNtoolkit needs pymc/pytensor/numba, which normdiff-bids does not depend on; it runs in its own
environment through ``benchmarks/pcntoolkit_worker.py`` (``--pcn-python``, default
``$NORMDIFF_PCN_PYTHON`` or ``/work/bench-venv/bin/python``). Without it, its rows give the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import GaussianSplineBaseline  # noqa: E402

from normdiff_bids.evaluation import (  # noqa: E402
    absolute_centile_error,
    centile_error,
    correlation_matrix_error,
    empirical_coverage,
    generated_table,
    pit_summary,
)

METHODS = ("film-mlp", "saint", "pcn-blr", "pcn-blr-shash", "gauss-spline")
LABELS = {
    "film-mlp": "ours FiLM-MLP",
    "saint": "ours SAINT",
    "pcn-blr": "PCNtoolkit BLR",
    "pcn-blr-shash": "PCNtoolkit BLR + SHASH warp",
    "gauss-spline": "Gaussian spline baseline",
}
COVARIATES = ("age", "sex", "site")
SMALL_REAL_IDPS = ("Left-Hippocampus", "Right-Hippocampus", "Left-Amygdala", "Right-Amygdala",
                   "Left-Thalamus-Proper", "Right-Thalamus-Proper", "Left-Caudate", "Right-Caudate",
                   "Left-Putamen", "Right-Putamen", "EstimatedTotalIntraCranialVol")
#: Columns of fcon1000.csv that are not IDPs: ids, covariates and a QC measure (mean Euler number).
REAL_NON_IDPS = ("sub_id", "age", "sex", "site", "avg_en")
#: Sites smaller than this go wholly to training: a 70/30 split would leave 0-1 test people, and a
#: test-only site would be unknown to every model.
MIN_SITE_FOR_SPLIT = 5
MIN_SITE_TEST = 20
DEFAULT_PCN_PYTHON = "/work/bench-venv/bin/python"


@dataclass
class Dataset:
    name: str
    train: pd.DataFrame
    test: pd.DataFrame
    idps: list[str]
    truth: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Precomputed:
    """A fitted model's outputs on the test table, computed elsewhere (PCNtoolkit's own environment)."""

    idps_: list[str]
    centiles: np.ndarray
    samples: np.ndarray
    covariates: tuple = COVARIATES

    def predict_centiles(self, table):
        return pd.DataFrame(self.centiles, index=table.index, columns=self.idps_)

    def sample(self, covariates, n_samples):
        return self.samples[:, :n_samples]


# ---------------------------------------------------------------------- data
def synthetic_dataset(n_idps: int, n_train: int, n_test: int, seed: int = 0) -> Dataset:
    from normdiff_bids.data.synthetic import SyntheticCohort

    cohort = SyntheticCohort(n_idps=n_idps, n_sites=3, seed=seed)
    train = cohort.sample(n_train, seed=seed + 1)
    test = cohort.sample(n_test, seed=seed + 2)
    return Dataset(f"synthetic D={n_idps}", train, test, list(cohort.idps), truth=cohort.cdf(test),
                   notes=[f"SyntheticCohort(n_idps={n_idps}, n_sites=3, seed={seed}); train seed {seed + 1}, "
                          f"test seed {seed + 2}"])


def split_by_site(table: pd.DataFrame, test_fraction: float = 0.3, seed: int = 0):
    """70/30 split within each site (seeded); sites under MIN_SITE_FOR_SPLIT people go wholly to training."""
    rng = np.random.default_rng(seed)
    test_rows, small = [], []
    for site, rows in table.groupby("site", sort=True).indices.items():
        if len(rows) < MIN_SITE_FOR_SPLIT:
            small.append(f"{site} ({len(rows)})")
            continue
        n_test = int(round(test_fraction * len(rows)))
        test_rows.extend(rng.choice(rows, size=n_test, replace=False))
    is_test = np.zeros(len(table), dtype=bool)
    is_test[np.asarray(test_rows, dtype=int)] = True
    return table[~is_test].reset_index(drop=True), table[is_test].reset_index(drop=True), small


def real_dataset(path: Path, idp_set: str, seed: int = 0) -> Dataset:
    table = pd.read_csv(path)
    table["site"] = table["site"].astype(str)
    train, test, small = split_by_site(table, seed=seed)
    notes = [f"{path.name}: {len(table)} people, {table['site'].nunique()} sites; 70/30 split within site "
             f"(seed {seed}): {len(train)} train, {len(test)} test"]
    if small:
        notes.append(f"sites under {MIN_SITE_FOR_SPLIT} people kept wholly in training: {', '.join(small)}")
    if idp_set == "small":
        idps = list(SMALL_REAL_IDPS)
    else:
        candidates = [c for c in table.columns if c not in REAL_NON_IDPS
                      and pd.api.types.is_numeric_dtype(table[c])]
        constant = [c for c in candidates if train[c].nunique() <= 1]
        duplicate = [c for i, c in enumerate(candidates) if c not in constant and any(
            train[c].equals(train[o]) for o in candidates[:i] if o not in constant)]
        idps = [c for c in candidates if c not in constant and c not in duplicate]
        notes.append(f"full set: {len(idps)} IDPs (dropped constant in training: {constant or 'none'}; "
                     f"exact duplicates: {duplicate or 'none'})")
    return Dataset(f"fcon1000 {idp_set} (D={len(idps)})", train, test, idps, notes=notes)


# ---------------------------------------------------------------------- methods
def fit_ours(backbone: str, data: Dataset, args) -> tuple[object, float]:
    from normdiff_bids import NormativeDiffusion

    model = NormativeDiffusion(backbone=backbone, covariates=COVARIATES, seed=args.seed, device="auto",
                               epochs=args.epochs, n_samples=args.n_score_samples, grid_step=args.grid_step,
                               verbose=False)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(data.train[[*COVARIATES, *data.idps]], idps=data.idps)
    return model, time.perf_counter() - start


def fit_baseline(data: Dataset, args) -> tuple[object, float]:
    model = GaussianSplineBaseline(covariates=COVARIATES, seed=args.seed)
    start = time.perf_counter()
    model.fit(data.train, idps=data.idps)
    return model, time.perf_counter() - start


def run_pcn_worker(tables: dict[str, pd.DataFrame], config: dict, python: str, timeout: float) -> dict:
    """Run ``pcntoolkit_worker.py`` in PCNtoolkit's environment on ``tables`` (written as
    ``<name>.csv``) and ``config``; return every ``.npz`` it wrote, by name, as dicts of arrays.

    One BLAS thread unless the caller sets it: PCNtoolkit's L-BFGS thrashes with more.
    """
    if not python or not Path(python).exists():
        raise RuntimeError(f"PCNtoolkit environment not found ({python!r}); create one with "
                           "`python3 -m venv /work/bench-venv && "
                           "/work/bench-venv/bin/pip install pcntoolkit` "
                           "or pass --pcn-python")
    worker = Path(__file__).resolve().parent / "pcntoolkit_worker.py"
    with tempfile.TemporaryDirectory(prefix="pcn_") as tmp:
        work = Path(tmp)
        for name, table in tables.items():
            table.to_csv(work / f"{name}.csv", index=False)
        (work / "config.json").write_text(json.dumps(config))
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env.setdefault(var, "1")
        proc = subprocess.run([python, str(worker), str(work)], capture_output=True, text=True, env=env,
                              timeout=timeout)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError("PCNtoolkit worker failed: " + " | ".join(tail))
        return {path.stem: dict(np.load(path)) for path in work.glob("*.npz")}


def run_pcntoolkit(data: Dataset, warp: str | None, args) -> tuple[Precomputed, float, float]:
    columns = [*COVARIATES, *data.idps]
    results = run_pcn_worker(
        {"train": data.train[columns], "test": data.test[columns]},
        {"idps": data.idps, "covariates": ["age"], "batch_effects": ["sex", "site"],
         "quantile_levels": [0.025, 0.5, 0.975], "n_samples": args.n_samples, "seed": args.seed,
         "warp": warp, "n_iter": args.pcn_iter},
        args.pcn_python, args.pcn_timeout)
    result = results["result"]
    model = Precomputed(list(data.idps), result["centiles"], result["samples"])
    return model, float(result["fit_s"]), float(result["score_s"])


# ---------------------------------------------------------------------- metrics
def score(model, data: Dataset, args, fit_s: float, score_s: float | None = None) -> dict:
    test = data.test
    if score_s is None:
        start = time.perf_counter()
        centiles = model.predict_centiles(test[[*COVARIATES, *data.idps]])
        score_s = time.perf_counter() - start
    else:
        centiles = model.predict_centiles(test)
    centiles = pd.DataFrame(np.asarray(centiles[data.idps], dtype=float), index=test.index, columns=data.idps)
    generated = generated_table(model, test, args.n_samples, data.idps, COVARIATES)
    ace = absolute_centile_error(test, generated, idps=data.idps)
    coverage = empirical_coverage(centiles)
    row = {
        "ACE": ace["ace"],
        "|c-truth|": (centile_error(centiles, data.truth)["mean_abs_error"]
                      if data.truth is not None else None),
        "|cov95-.95|": coverage["abs_error"],
        "PIT-KS": pit_summary(centiles)["ks"],
        "corr err": correlation_matrix_error(test, generated, idps=data.idps)["frobenius"]
        if len(data.idps) > 1 else None,
    }
    worst = []
    for rows in test.groupby("site").indices.values():
        if len(rows) >= MIN_SITE_TEST:
            worst.append(empirical_coverage(centiles.iloc[rows])["abs_error"])
    row["worst site |cov95-.95|"] = max(worst) if worst else None
    row["fit s"] = fit_s
    row["score s"] = score_s
    row["_ace_floor"] = ace["noise_floor"]
    return row


def saint_args(args):
    """SAINT's sampling settings: its network costs 6-40x the FiLM-MLP's per row (D=20 to 200), so it
    draws fewer samples on a coarser grid to keep a dataset within 30 minutes on a 2-core CPU."""
    return argparse.Namespace(**{**vars(args), "n_score_samples": args.saint_score_samples,
                                 "n_samples": args.saint_samples, "grid_step": args.saint_grid_step})


def run_method(method: str, data: Dataset, args) -> dict:
    try:
        limit = args.saint_max_idps
        if method == "saint" and limit is not None and len(data.idps) > limit:
            raise RuntimeError(f"skipped: {len(data.idps)} IDPs exceed --saint-max-idps={limit} "
                               "(at D=200 its network costs ~40x the FiLM-MLP's per row: over an hour "
                               "on a 2-core CPU; see benchmarks/dimension_scaling.py)")
        if method in ("film-mlp", "saint"):
            method_args = saint_args(args) if method == "saint" else args
            model, fit_s = fit_ours(method, data, method_args)
            row = score(model, data, method_args, fit_s)
            if method == "saint":
                row["_settings"] = (f"SAINT: {method_args.n_score_samples} draws per covariate point, "
                                    f"{method_args.n_samples} per test person, "
                                    f"{method_args.grid_step or 'default'}-year grid")
            return row
        if method == "gauss-spline":
            model, fit_s = fit_baseline(data, args)
            return score(model, data, args, fit_s)
        if method in ("pcn-blr", "pcn-blr-shash"):
            warp = "WarpSinhArcsinh" if method == "pcn-blr-shash" else None
            limit = args.pcn_warp_max_idps if warp else args.pcn_max_idps
            if limit is not None and len(data.idps) > limit:
                raise RuntimeError(f"skipped: {len(data.idps)} IDPs exceed --pcn{'-warp' if warp else ''}"
                                   f"-max-idps={limit} (PCNtoolkit fits one BLR per IDP)")
            model, fit_s, score_s = run_pcntoolkit(data, warp, args)
            return score(model, data, args, fit_s, score_s)
        raise ValueError(f"unknown method {method!r}")
    except Exception as exc:  # one failing method must not hide the others' results
        return {"note": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]}


# ---------------------------------------------------------------------- table
COLUMNS = [
    "ACE", "|c-truth|", "|cov95-.95|", "PIT-KS", "corr err", "worst site |cov95-.95|", "fit s", "score s",
]


def _columns(data: Dataset) -> list[str]:
    return [c for c in COLUMNS if data.truth is not None or c != "|c-truth|"]


def _width(methods) -> int:
    return max(len(LABELS[m]) for m in methods) + 2


def format_header(data: Dataset, methods, args) -> str:
    lines = [f"## {data.name}: {len(data.train)} train, {len(data.test)} test"]
    lines += [f"   {note}" for note in data.notes]
    n_sites = int((data.test.groupby("site").size() >= MIN_SITE_TEST).sum())
    lines.append(f"   worst-site coverage over the {n_sites} site(s) with >= {MIN_SITE_TEST} test people; "
                 f"{args.n_samples} samples per test person for ACE and corr err; smaller is better")
    columns = _columns(data)
    header = "method".ljust(_width(methods)) + "".join(c.rjust(max(11, len(c) + 2)) for c in columns)
    return "\n".join([*lines, header, "-" * len(header)])


def format_row(data: Dataset, method: str, row: dict, methods) -> str:
    line = LABELS[method].ljust(_width(methods))
    if "note" in row:
        return line + "  " + row["note"]
    for c in _columns(data):
        value = row.get(c)
        cell = "n/a" if value is None else (f"{value:.1f}" if c.endswith(" s") else f"{value:.4f}")
        line += cell.rjust(max(11, len(c) + 2))
    return line


def format_footer(rows: dict[str, dict]) -> str:
    lines = [f"   {r['_settings']}" for r in rows.values() if "_settings" in r]
    floors = [r["_ace_floor"] for r in rows.values() if "_ace_floor" in r]
    if floors:
        lines.append(f"   ACE of a perfect model on these age bins (binomial noise floor): {floors[0]:.4f}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=Path,
                        help="fcon1000.csv: run on real data instead of synthetic cohorts")
    parser.add_argument("--idp-set", choices=("small", "full", "both"), default="both",
                        help="real-data IDP set (default: both, one table each)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--quick", action="store_true",
                        help="small cohorts and short training: checks the benchmark runs, not who wins")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dims", type=lambda v: tuple(int(d) for d in v.split(",")), default=None,
                        help="synthetic cohorts: comma-separated numbers of IDPs (default 4,20)")
    parser.add_argument("--grid-step", type=float, default=None,
                        help="our models' scoring grid step in years (default: the estimator's)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs of our models (default: auto)")
    parser.add_argument("--n-samples", type=int, default=200, help="samples per test person for ACE/corr err")
    parser.add_argument("--n-score-samples", type=int, default=1000, help="samples per person for centiles")
    parser.add_argument("--saint-score-samples", type=int, default=300,
                        help="SAINT: samples per covariate point for centiles")
    parser.add_argument("--saint-samples", type=int, default=50,
                        help="SAINT: samples per test person for ACE/corr err")
    parser.add_argument("--saint-grid-step", type=float, default=1.0,
                        help="SAINT: scoring grid step in years")
    parser.add_argument("--saint-max-idps", type=int, default=100,
                        help="run SAINT only up to this many IDPs (its cost grows with D)")
    parser.add_argument("--pcn-python", default=os.environ.get("NORMDIFF_PCN_PYTHON", DEFAULT_PCN_PYTHON))
    parser.add_argument("--pcn-iter", type=int, default=100, help="PCNtoolkit BLR optimiser iterations")
    parser.add_argument("--pcn-max-idps", type=int, default=None,
                        help="run PCNtoolkit BLR only up to this many IDPs (default: no limit)")
    parser.add_argument("--pcn-warp-max-idps", type=int, default=None,
                        help="run the SHASH-warped BLR only up to this many IDPs (default: no limit)")
    parser.add_argument("--pcn-timeout", type=int, default=1800,
                        help="seconds before the PCNtoolkit run is stopped")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {','.join(METHODS)}")
    if args.quick:
        args.epochs = args.epochs or 20
        args.n_samples = min(args.n_samples, 50)
        args.n_score_samples = min(args.n_score_samples, 200)
        args.saint_samples = min(args.saint_samples, 50)
        args.saint_score_samples = min(args.saint_score_samples, 200)
        args.pcn_iter = min(args.pcn_iter, 30)
        args.pcn_warp_max_idps = min(args.pcn_warp_max_idps or 4, 4)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("NORMDIFF_QUIET", "1")
    if args.real is not None:
        sets = ("small", "full") if args.idp_set == "both" else (args.idp_set,)
        datasets = [real_dataset(args.real, s, args.seed) for s in sets]
        if args.quick:
            datasets = [d for d in datasets if len(d.idps) <= 20] or datasets[:1]
    else:
        n_train, n_test = (1000, 300) if args.quick else (6000, 1000)
        sizes = args.dims or ((4,) if args.quick else (4, 20))
        datasets = [synthetic_dataset(d, n_train, n_test, args.seed) for d in sizes]
    for data in datasets:
        # Rows are printed as they finish, so a long run shows its progress and keeps what it measured.
        print(format_header(data, args.methods, args), flush=True)
        rows = {}
        for method in args.methods:
            rows[method] = run_method(method, data, args)
            print(format_row(data, method, rows[method], args.methods), flush=True)
        print(format_footer(rows), flush=True)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
