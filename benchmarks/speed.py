"""Where users wait: the demo, one participant against an installed model, real and synthetic cohorts, and
PCNtoolkit's warped BLR on the same fcon1000 split, in one invocation so that ratios hold on a busy
machine. Each speed has its calibration beside it, so that speed never silently buys miscalibration.
Prints one table.

    python benchmarks/speed.py                          # every row (about an hour on 2 cores)
    python benchmarks/speed.py --rows demo participant  # the two product rows
    python benchmarks/speed.py --rows fcon-small --real ../shared/reference/fcon1000/fcon1000.csv

Rows:
- ``demo``: ``make demo`` in a fresh folder (the package already installed), wall seconds; calibration
  of the held-out controls from the group level's evaluation.
- ``participant``: ``normdiff-bids BIDS OUT participant --participant-label 001`` against the demo's
  installed model with a fresh work folder, Python start included.
- ``fcon-small`` / ``fcon-full``: fcon1000 (``--real``), 70/30 split within site, 11 / about 212 IDPs;
  fit, then score the held-out people (centiles and joint deviation), ours and PCNtoolkit's BLR
  with its sinh-arcsinh warp (one BLAS thread), PIT-KS and |cov95 - 0.95| of the held-out centiles.
- ``d100``: synthetic, 300 people, D = 100, 20 Zipf-sized sites; fit, then score 600 people.
- ``big``: synthetic, N = 10,000, D = 200; fit, score 1000 people, peak memory.

Each row runs in its own process (peak memory is that process's). Targets: demo <= 180 s; participant
<= 5 s; fcon-small ours <= 2x PCNtoolkit (fit + score) at calibration at least as good; fcon-full ours
<= 1/3 of PCNtoolkit; big: fit <= 600 s, score <= 60 s, peak <= 4 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

ROWS = ("demo", "participant", "fcon-small", "fcon-full", "d100", "big")
COVARIATES = ("age", "sex", "site")
TARGETS = {"demo": "<= 180 s", "participant": "<= 5 s", "fcon-small": "ours <= 2x PCN",
           "fcon-full": "ours <= 1/3 PCN", "big": "fit <= 600 s, score <= 60 s, peak <= 4 GiB"}


def _calibration(centiles: np.ndarray) -> dict:
    from normdiff_bids.evaluation import empirical_coverage, pit_summary

    frame = pd.DataFrame(centiles)
    return {"|cov95-.95|": empirical_coverage(frame)["abs_error"], "PIT-KS": pit_summary(frame)["ks"]}


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


# ---------------------------------------------------------------------- rows run in a child process
def row_fcon(args, idp_set: str) -> list[dict]:
    from peers import real_dataset, run_pcntoolkit

    from normdiff_bids import NormativeDiffusion

    data = real_dataset(args.real, idp_set, seed=args.seed)
    columns = [*COVARIATES, *data.idps]
    model = NormativeDiffusion(covariates=COVARIATES, seed=args.seed, verbose=False)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(data.train[columns], idps=data.idps)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = model.score(data.test[columns])
    score_s = time.perf_counter() - start
    centiles = scores["centile"].to_numpy().reshape(len(data.test), -1)
    label = f"fcon1000 D={len(data.idps)}, {len(data.train)} fit / {len(data.test)} scored"
    rows = [{"row": label, "method": "normdiff (film-mlp)", "fit s": fit_s, "score s": score_s,
             **_calibration(centiles), "peak GiB": _peak_gib()}]
    try:
        pcn_args = argparse.Namespace(n_samples=10, seed=args.seed, pcn_iter=100, pcn_python=args.pcn_python,
                                      pcn_timeout=3600)
        pcn, pcn_fit, pcn_score = run_pcntoolkit(data, "WarpSinhArcsinh", pcn_args)
        pcn_centiles = np.asarray(pcn.predict_centiles(data.test)[data.idps], dtype=float)
        rows.append({"row": label, "method": "PCNtoolkit BLR+SHASH (1 thread)", "fit s": pcn_fit,
                     "score s": pcn_score, **_calibration(pcn_centiles)})
        ratio = (fit_s + score_s) / (pcn_fit + pcn_score)
        rows[0]["ratio"] = ratio
    except Exception as exc:  # a missing peer must not hide our figures
        rows.append({"row": label, "method": "PCNtoolkit BLR+SHASH", "note": str(exc).splitlines()[0][:120]})
    return rows


def row_synthetic(args, n_train: int, n_idps: int, n_sites: int, n_score: int, label: str) -> list[dict]:
    from normdiff_bids import NormativeDiffusion
    from normdiff_bids.data.synthetic import SyntheticCohort

    cohort = SyntheticCohort(n_idps=n_idps, n_sites=n_sites, seed=args.seed, site_sizes="zipf")
    train = cohort.sample(n_train, seed=args.seed + 1)
    test = cohort.sample(n_score, seed=args.seed + 2)
    test = test[test["site"].isin(set(train["site"]))]
    model = NormativeDiffusion(seed=args.seed, verbose=False)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(train)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = model.score(test)
    score_s = time.perf_counter() - start
    centiles = scores["centile"].to_numpy().reshape(len(test), -1)
    truth = cohort.cdf(test).to_numpy()
    return [{"row": label, "method": "normdiff (film-mlp)", "fit s": fit_s, "score s": score_s,
             **_calibration(centiles), "|c-truth|": float(np.abs(centiles - truth).mean()),
             "peak GiB": _peak_gib()}]


def run_child(row: str, args) -> list[dict]:
    if row == "fcon-small":
        return row_fcon(args, "small")
    if row == "fcon-full":
        return row_fcon(args, "full")
    if row == "d100":
        return row_synthetic(args, 300, 100, 20, 600, "synthetic N=300, D=100, 20 sites; score 600")
    if row == "big":
        return row_synthetic(args, 10_000, 200, 3, 1000, "synthetic N=10,000, D=200; score 1000")
    raise ValueError(row)


# ---------------------------------------------------------------------- product rows (whole commands)
def _timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed: {(proc.stderr or proc.stdout)[-400:]}")
    return time.perf_counter() - start


def product_rows(rows: list[str], demo_dir: Path) -> list[dict]:
    env = dict(os.environ, CI="true")
    out = []
    bids = demo_dir / "bids"
    derivatives = bids / "derivatives" / "normdiff"
    if "demo" in rows:
        shutil.rmtree(demo_dir, ignore_errors=True)
        seconds = _timed(["make", "demo", f"DEMO_DIR={demo_dir}"], env)
        metrics = json.loads(next((demo_dir / "work").rglob("train_model/metrics.json")).read_text())
        m = metrics["evaluation"]["metrics"]
        out.append({"row": "make demo (300 people, 107 IDPs)", "method": "normdiff", "wall s": seconds,
                    "|cov95-.95|": m["coverage95_abs_error"], "PIT-KS": m["pit_ks"],
                    "note": f"held-out controls: {m['n_holdout']}; joint PIT-KS {m['joint_pit_ks']:.3f}"})
    if "participant" in rows:
        if not (derivatives / "models" / "default").is_dir():
            out.append({"row": "one participant", "note": "needs the demo row first (its installed model)"})
        else:
            work = Path(tempfile.mkdtemp(prefix="speed_participant_"))
            exe = str(Path(sys.executable).with_name("normdiff-bids"))
            seconds = _timed([exe, str(bids), str(derivatives), "participant", "--participant-label", "001",
                              "--work-dir", str(work), "--quiet"], env)
            shutil.rmtree(work, ignore_errors=True)
            out.append({"row": "one participant vs installed model", "method": "normdiff", "wall s": seconds,
                        "note": "Python start, BIDS/FreeSurfer read, scoring, table, maps, report"})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--real", type=Path, default=ROOT.parent / "shared" / "reference" / "fcon1000" /
                        "fcon1000.csv", help="fcon1000.csv for the fcon rows")
    parser.add_argument("--demo-dir", type=Path, default=Path(tempfile.gettempdir()) / "normdiff_speed_demo")
    parser.add_argument("--pcn-python", default=os.environ.get("NORMDIFF_PCN_PYTHON", sys.executable))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.child:
        print(json.dumps(run_child(args.child, args), default=float))
        return 0
    results = product_rows([r for r in args.rows if r in ("demo", "participant")], args.demo_dir)
    for row in [r for r in args.rows if r not in ("demo", "participant")]:
        if row.startswith("fcon") and not args.real.is_file():
            results.append({"row": row, "note": f"skipped: {args.real} not found (--real)"})
            continue
        proc = subprocess.run([sys.executable, __file__, "--child", row, "--real", str(args.real),
                               "--pcn-python", args.pcn_python, "--seed", str(args.seed)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            results.append({"row": row, "note": (proc.stderr or proc.stdout).strip().splitlines()[-1][:160]})
            continue
        results += json.loads(proc.stdout.strip().splitlines()[-1])
    table = pd.DataFrame(results)
    order = [c for c in ("row", "method", "wall s", "fit s", "score s", "ratio", "|cov95-.95|", "PIT-KS",
                         "|c-truth|", "peak GiB", "note") if c in table.columns]
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 70):
        print(f"targets: {TARGETS}")
        print(table[order].to_string(index=False, na_rep="", float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
