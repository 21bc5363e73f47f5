"""New sites from a few controls: adapting a trained model to an unseen site. One table.

Real data (``--real fcon1000.csv``): leave one site out, for every site with at least 40 people.
Train on the other sites; adapt with k in {5, 10, 20} of the left-out site's people (several random
draws of the k, each with both sexes) and test on the rest of that site. Compared: no adaptation (the
left-out site scored under the marginal over sites), ``NormativeDiffusion.adapt``, a refit from
scratch on the other sites plus the k (first draw only: it costs a whole fit), and PCNtoolkit's
``transfer`` of its BLR with the sinh-arcsinh warp on the same split, with one BLAS thread (in
PCNtoolkit 1.3 the BLR's ``transfer`` works only with a warp). Synthetic (``--synthetic``): the same on a
Zipf-sized 20-site cohort with exact truth, leaving out large sites, with mean |centile - truth|.

Columns: |cov95 - 0.95|, PIT-KS and |mean z| (bias) on the adapted site's test people, averaged over
sites and draws; mean |centile - truth| (synthetic); adaptation seconds.

    python benchmarks/transfer.py --real ../shared/reference/fcon1000/fcon1000.csv
    python benchmarks/transfer.py --synthetic --ks 5 20 --draws 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import COVARIATES, REAL_NON_IDPS, SMALL_REAL_IDPS, run_pcn_worker  # noqa: E402

MIN_SITE = 40
METHODS = ("no adaptation", "ours: adapt", "ours: refit", "PCNtoolkit BLR + SHASH transfer")


def _metrics(u: np.ndarray, truth: np.ndarray | None) -> dict:
    z = stats.norm.ppf(np.clip(u, 1e-12, 1 - 1e-12))
    row = {"|cov95-.95|": abs(float(np.mean((u > 0.025) & (u < 0.975))) - 0.95),
           "PIT-KS": float(stats.kstest(u.ravel(), "uniform").statistic),
           "|mean z|": float(abs(z.mean()))}
    if truth is not None:
        row["|c-truth|"] = float(np.abs(u - truth).mean())
    return row


def _ours(train, idps, args, **params):
    from normdiff_bids import NormativeDiffusion

    model = NormativeDiffusion(covariates=COVARIATES, seed=args.seed, n_samples=args.n_samples,
                               verbose=False, unknown_site="marginal", **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(train[[*COVARIATES, *idps]], idps=idps)


def _centiles(model, table, idps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.predict_centiles(table[[*COVARIATES, *idps]])[idps].to_numpy()


def _pcn_transfer(train, jobs, idps, args) -> list[tuple[np.ndarray, float]]:
    """Fit PCNtoolkit's BLR on ``train`` once, then transfer it for each (adapt, test) job."""
    columns = [*COVARIATES, *idps]
    tables = {"train": train[columns], "test": train[columns].head(20)}  # the worker scores a known site
    for i, (adapt, test) in enumerate(jobs):
        tables[f"transfer_{i}_adapt"], tables[f"transfer_{i}_test"] = adapt[columns], test[columns]
    results = run_pcn_worker(tables, {
        "idps": idps, "covariates": ["age"], "batch_effects": ["sex", "site"], "quantile_levels": [0.5],
        "n_samples": 2, "seed": args.seed, "warp": "WarpSinhArcsinh", "n_iter": 200,
        "n_transfers": len(jobs)}, args.pcn_python, 3600)
    return [(results[f"transfer_{i}"]["centiles"], float(results[f"transfer_{i}"]["adapt_s"]))
            for i in range(len(jobs))]


def _draw_order(rows: pd.DataFrame, rng) -> np.ndarray:
    """A random order of the site's people in which the first two are one of each sex (where the site
    has both): PCNtoolkit's transfer refuses to score a sex its adaptation set lacked."""
    order = rng.permutation(len(rows))
    sex = rows["sex"].astype(str).to_numpy()[order]
    firsts = [int(np.flatnonzero(sex == level)[0]) for level in np.unique(sex)]
    return np.concatenate([order[firsts], np.delete(order, firsts)])


def leave_one_site_out(table: pd.DataFrame, idps, args, truth_fn=None) -> pd.DataFrame:
    records = []
    sizes = table["site"].value_counts()
    eligible = sizes[sizes >= MIN_SITE]
    if args.max_sites:
        eligible = eligible.nlargest(args.max_sites)
    for site in sorted(eligible.index):
        rows = table[table["site"] == site].reset_index(drop=True)
        train = table[table["site"] != site].reset_index(drop=True)
        base = _ours(train, idps, args)
        jobs = []
        for k in args.ks:
            for draw in range(args.draws):
                order = _draw_order(rows, np.random.default_rng([args.seed, draw, k]))
                jobs.append((k, draw, rows.iloc[order[:k]], rows.iloc[order[k:]].reset_index(drop=True)))
        pcn = [None] * len(jobs)
        if "pcn" in args.methods:
            try:
                pcn = _pcn_transfer(train, [(a, t) for _, _, a, t in jobs], idps, args)
            except Exception as err:  # keep the other rows; say why this one is missing
                print(f"  PCNtoolkit transfer for {site}: {err}", file=sys.stderr, flush=True)
        for (k, draw, adapt, test), pcn_result in zip(jobs, pcn):
            truth = truth_fn(test) if truth_fn is not None else None
            out = {"no adaptation": (_centiles(base, test, idps), 0.0)}
            start = time.perf_counter()
            adapted = base.adapt(adapt)
            seconds = time.perf_counter() - start
            out["ours: adapt"] = (_centiles(adapted, test, idps), seconds)
            if draw == 0 and "refit" in args.methods:
                start = time.perf_counter()
                refit = _ours(pd.concat([train, adapt], ignore_index=True), idps, args)
                out["ours: refit"] = (_centiles(refit, test, idps), time.perf_counter() - start)
            if pcn_result is not None:
                out["PCNtoolkit BLR + SHASH transfer"] = pcn_result
            for method, (u, secs) in out.items():
                records.append({"site": site, "k": k, "draw": draw, "method": method, "adapt s": secs,
                                **_metrics(u, truth)})
            summary = "; ".join(f"{m} cov {r['|cov95-.95|']:.3f} KS {r['PIT-KS']:.3f}"
                                for m, r in ((m, _metrics(u, None)) for m, (u, _) in out.items()))
            print(f"  {site} k={k} draw={draw}: {summary}", file=sys.stderr, flush=True)
    return pd.DataFrame.from_records(records)


def format_table(results: pd.DataFrame, title: str) -> str:
    cols = [c for c in ("|cov95-.95|", "PIT-KS", "|mean z|", "|c-truth|", "adapt s") if c in results]
    means = results.groupby(["k", "method"])[cols].mean()
    lines = [f"### {title}", "", "| k | method | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for (k, method), row in means.iterrows():
        cells = [f"{row[c]:.2f}" if c == "adapt s" else f"{row[c]:.4f}" for c in cols]
        lines.append(f"| {k} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--real", type=Path, default=None, help="fcon1000.csv")
    p.add_argument("--idp-set", choices=("small", "full"), default="small")
    p.add_argument("--synthetic", action="store_true", help="add the synthetic cohort with exact truth")
    p.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--methods", default="refit,pcn", help="optional comparisons: refit, pcn")
    p.add_argument("--max-sites", type=int, default=None, help="leave out only the largest N eligible sites")
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pcn-python", default=os.environ.get("NORMDIFF_PCN_PYTHON", sys.executable))
    args = p.parse_args(argv)
    tables = []
    if args.real is not None:
        table = pd.read_csv(args.real)
        table["site"] = table["site"].astype(str)
        idps = list(SMALL_REAL_IDPS) if args.idp_set == "small" else [
            c for c in table.columns if c not in REAL_NON_IDPS and pd.api.types.is_numeric_dtype(table[c])
            and table[c].nunique() > 1]
        results = leave_one_site_out(table, idps, args)
        tables.append(format_table(results, f"fcon1000 {args.idp_set} (D={len(idps)}), leave one site out, "
                                            f"{results['site'].nunique()} sites with >= {MIN_SITE} people"))
    if args.synthetic:
        from normdiff_bids.data.synthetic import SyntheticCohort

        gen = SyntheticCohort(n_idps=20, n_sites=20, seed=args.seed, site_sizes="zipf", site_effect=3.0)
        table = gen.sample(1500, seed=args.seed + 1)
        results = leave_one_site_out(table, gen.idps, args, truth_fn=lambda t: gen.cdf(t).to_numpy())
        title = "synthetic (D=20, 1500 people, 20 Zipf-sized sites, site effect 3)"
        tables.append(format_table(results, title))
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
