"""Fit and score wall time and peak memory of NormativeDiffusion against the CPU targets.

Targets (2 CPU cores, FiLM-MLP defaults): a 10,000 x 200 cohort fits in <= 15 min and scores with
n_samples=1000 in <= 5 min. Also times scoring 1, 100 and 10,000 subjects, to show how cost grows.
Each phase runs in its own process so that its peak resident memory (``ru_maxrss``, which sees torch's
allocations, unlike tracemalloc) is its own.

    python benchmarks/scaling.py            # full sizes (tens of minutes)
    python benchmarks/scaling.py --quick    # small sizes, about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = {"n_train": 10_000, "n_idps": 200, "n_samples": 1000, "score_sizes": (1, 100, 10_000),
        "fit_target_s": 15 * 60, "score_target_s": 5 * 60, "epochs": None}
QUICK = {"n_train": 1_000, "n_idps": 20, "n_samples": 200, "score_sizes": (1, 10, 100),
         "fit_target_s": None, "score_target_s": None, "epochs": 5}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _cpu_seconds() -> float:
    # CPU time next to wall time: on a shared machine wall time mostly measures the other users
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _phase_fit(cfg: dict, model_dir: str) -> dict:
    from normdiff_bids import NormativeDiffusion
    from normdiff_bids.data.synthetic import SyntheticCohort

    cohort = SyntheticCohort(n_idps=cfg["n_idps"], n_sites=3, seed=0)
    train = cohort.sample(cfg["n_train"], seed=1)
    start, cpu = time.perf_counter(), _cpu_seconds()
    model = NormativeDiffusion(seed=0, epochs=cfg["epochs"], n_samples=cfg["n_samples"],
                               verbose=cfg["verbose"]).fit(train)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    model.save(model_dir, overwrite=True)
    s = model.training_summary_
    return {"seconds": seconds, "cpu_s": cpu, "peak_mb": _peak_rss_mb(),
            "detail": f"{s['epochs_run']}/{s['epochs_max']} epochs, best {s['best_epoch']}, "
                      f"{s['n_parameters'] / 1e6:.2f}M params"}


def _phase_score(cfg: dict, model_dir: str, n_subjects: int) -> dict:
    from normdiff_bids import load_model
    from normdiff_bids.data.synthetic import SyntheticCohort

    model = load_model(model_dir)
    model.set_params(verbose=cfg["verbose"])
    cohort = SyntheticCohort(n_idps=cfg["n_idps"], n_sites=3, seed=0)
    table = cohort.sample(n_subjects, seed=2)
    start, cpu = time.perf_counter(), _cpu_seconds()
    scores = model.score(table)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    assert len(scores) == n_subjects * cfg["n_idps"]
    grid = model.model_card()["scoring_grid"]
    detail = f"grid step {grid['step']:.2f} y" if grid else "exact"
    return {"seconds": seconds, "cpu_s": cpu, "peak_mb": _peak_rss_mb(), "detail": detail}


def _run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--verbose", action="store_true", help="show progress bars of the children")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--_phase", help=argparse.SUPPRESS)
    parser.add_argument("--_model", help=argparse.SUPPRESS)
    parser.add_argument("--_n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL, verbose=args.verbose)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    if args._phase == "fit":
        print(json.dumps(_phase_fit(cfg, args._model)))
        return 0
    if args._phase == "score":
        print(json.dumps(_phase_score(cfg, args._model, args._n)))
        return 0

    import torch

    flags = ["--quick"] if args.quick else []
    flags += ["--verbose"] if args.verbose else []
    flags += ["--threads", str(args.threads)] if args.threads else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(Path(tmp) / "model")
        fit = _run_child([*flags, "--_phase", "fit", "--_model", model_dir])
        rows.append(("fit", cfg["n_train"], fit, cfg["fit_target_s"]))
        for n in cfg["score_sizes"]:
            res = _run_child([*flags, "--_phase", "score", "--_model", model_dir, "--_n", str(n)])
            target = cfg["score_target_s"] if n == max(cfg["score_sizes"]) else None
            rows.append(("score", n, res, target))

    print(f"NormativeDiffusion scaling: D={cfg['n_idps']}, n_samples={cfg['n_samples']}, FiLM-MLP defaults, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    header = (f"{'phase':<6} {'rows':>7} {'wall s':>9} {'cpu s':>9} {'wall s/row':>10} {'peak MB':>8} "
              f"{'target s':>9} {'ok':>4}  detail")
    print(header)
    print("-" * len(header))
    for phase, n, res, target in rows:
        ok = "" if target is None else ("yes" if res["seconds"] <= target else "NO")
        print(f"{phase:<6} {n:>7} {res['seconds']:>9.1f} {res['cpu_s']:>9.1f} {res['seconds'] / n:>10.4f} "
              f"{res['peak_mb']:>8.0f} "
              f"{'' if target is None else target:>9} {ok:>4}  {res['detail']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
