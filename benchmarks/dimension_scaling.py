"""Dimension study: calibration and dependence of the FiLM-MLP and SAINT backbones as D (IDPs) grows.

Reproduces the dimension study of Whitbread, Palmer & Jenkinson (2026) on the project's ground-truth
generator (:class:`~normdiff_bids.data.synthetic.SyntheticCohort`): for each D, one cohort of N_train
reference subjects and a held-out set, a model per backbone, then one table with

- ``cent_err``: mean |model centile - true centile| over held-out subjects and IDPs (truth from
  ``SyntheticCohort.cdf``), next to ``mc_floor``, the error a perfect model still has with ``n_samples``
  draws (Monte Carlo);
- ``ace``: the paper's absolute centile error (1-year age bins, generated vs held-out values, averaged over
  IDPs and q in {0.02, 0.25, 0.5, 0.75, 0.98}), next to its binomial noise floor ``ace_floor``;
- ``cov95_err``: |coverage of the central 95% interval - 0.95|;
- ``corr_err`` / ``corr_pom``: Frobenius error of the IDP correlation matrix (standardised IDPs) of the
  model's samples, and of the product of its conditional marginals (IDPs shuffled independently within
  each subject's samples: what independent per-IDP models give), both against the held-out subjects;
- ``fit_s``, ``score_s``: wall seconds of ``fit`` and of ``predict_centiles`` on the held-out set, and
  ``fit_cpu``, ``score_cpu`` the CPU seconds of the same; ``net_us``: microseconds per row of one
  eval-mode network evaluation (CPU: one thread, CPU time), so ``net_us`` ratios are the cost ratios of
  the backbones per network evaluation.

Metrics come from :mod:`normdiff_bids.evaluation`.

    python benchmarks/dimension_scaling.py                 # D in {2, 20, 100, 200}, N_train=6000, 1000 test
    python benchmarks/dimension_scaling.py --quick         # D in {2, 20}, small sizes, a few minutes
    python benchmarks/dimension_scaling.py --preset paper --device cuda

Timings on a shared CPU mostly measure the other users; compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

#: The full study. 200 draws per covariate point on a 1-year grid (``mc_floor`` shows what that costs in
#: centile error) keep SAINT's scoring at D=200 to about half an hour of one CPU core.
FULL = {"dims": (2, 20, 100, 200), "n_train": 6000, "n_test": 1000, "n_samples": 200, "n_generated": 10,
        "epochs": None, "steps": None, "grid_step": 1.0}
QUICK = {"dims": (2, 20), "n_train": 600, "n_test": 100, "n_samples": 100, "n_generated": 10,
         "epochs": 10, "steps": 10, "grid_step": None}
BACKBONES = ("film-mlp", "saint")
COVARIATES = ("age", "sex", "site")

#: Targets at D=200 for the default backbone of that size.
TARGETS = {"cent_err": 0.04, "cov95_err": 0.03, "corr_ratio": 0.5}


def monte_carlo_floor(n_samples: int, n_grid: int = 2001) -> float:
    """E|K/S - u| for u ~ Uniform(0, 1) and K ~ Binomial(S, u): a perfect model's mean centile error."""
    u = (np.arange(n_grid) + 0.5) / n_grid
    k = np.arange(n_samples + 1)
    pmf = stats.binom.pmf(k[None, :], n_samples, u[:, None])
    return float(np.mean(np.sum(pmf * np.abs(k[None, :] / n_samples - u[:, None]), axis=1)))


def network_us_per_row(model, rows: int = 512, repeats: int = 5) -> float:
    """Microseconds per row of one eval-mode forward pass of the fitted denoiser (best of ``repeats``).

    On CPU: thread CPU time on one thread, which other users of a shared machine disturb far less than
    wall time. On CUDA: wall time with synchronisation, on a batch of 8192 rows.
    """
    import torch

    net, enc = model.network_, model.encoder_
    device = next(net.parameters()).device
    cuda = device.type == "cuda"
    rows = 8192 if cuda else rows
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, model.n_features_in_, generator=g).to(device)
    t = torch.rand(rows, generator=g).to(device)
    cond = torch.randn(rows, enc.cond_dim, generator=g).to(device)
    clock = time.perf_counter if cuda else time.thread_time
    threads = torch.get_num_threads()
    best = math.inf
    try:
        if not cuda:
            torch.set_num_threads(1)
        with torch.no_grad():
            net(x, t, cond)
            for _ in range(repeats):
                if cuda:
                    torch.cuda.synchronize()
                start = clock()
                net(x, t, cond)
                if cuda:
                    torch.cuda.synchronize()
                best = min(best, clock() - start)
    finally:
        torch.set_num_threads(threads)
    return best / rows * 1e6


def cpu_seconds() -> float:
    """CPU seconds used by this process so far (next to wall time: on a shared machine wall time mostly
    measures the other users)."""
    return time.process_time()


def run_one(cohort, train, test, backbone: str, cfg: dict, args) -> dict:
    from normdiff_bids import NormativeDiffusion
    from normdiff_bids.evaluation.calibration import absolute_centile_error, centile_error
    from normdiff_bids.evaluation.coverage import empirical_coverage
    from normdiff_bids.evaluation.dependence import correlation_matrix_error, product_of_marginals
    from normdiff_bids.evaluation.evaluate import generated_table

    model = NormativeDiffusion(backbone=backbone, covariates=COVARIATES, seed=args.seed, device=args.device,
                               epochs=cfg["epochs"], n_samples=cfg["n_samples"], steps=cfg["steps"],
                               preset=None if args.preset == "default" else args.preset,
                               grid_step=cfg["grid_step"], verbose=args.verbose, lr=args.lr,
                               **({"batch_size": args.batch_size} if args.batch_size else {}))
    start, cpu = time.perf_counter(), cpu_seconds()
    model.fit(train)
    fit_s, fit_cpu = time.perf_counter() - start, cpu_seconds() - cpu
    if args.history:
        from normdiff_bids.atomic import atomic_write_text

        history = Path(args.history) / f"history_D{len(cohort.idps)}_{backbone}.csv"
        history.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(history, model.history_.to_csv(index=False))

    start, cpu = time.perf_counter(), cpu_seconds()
    centiles = model.predict_centiles(test)
    score_s, score_cpu = time.perf_counter() - start, cpu_seconds() - cpu

    idps = list(cohort.idps)
    truth = cohort.cdf(test)
    generated = generated_table(model, test, cfg["n_generated"], idps, COVARIATES)
    ace = absolute_centile_error(test, generated, idps)
    row = {
        "D": len(idps), "backbone": backbone,
        "params": model.training_summary_["n_parameters"],
        "epochs": f"{model.training_summary_['epochs_run']}/{model.training_summary_['epochs_max']}",
        "val_loss": model.training_summary_["best_val_loss"] or math.nan,
        "fit_s": fit_s, "fit_cpu": fit_cpu, "score_s": score_s, "score_cpu": score_cpu,
        "net_us": network_us_per_row(model),
        "cent_err": centile_error(centiles, truth, idps)["mean_abs_error"],
        "mc_floor": monte_carlo_floor(int(model.n_samples)),
        "ace": ace["ace"], "ace_floor": ace["noise_floor"],
        "cov95_err": empirical_coverage(centiles, idps, nominal=0.95)["abs_error"],
        "corr_err": math.nan, "corr_pom": math.nan, "corr_ratio": math.nan,
    }
    if len(idps) >= 2:
        row["corr_err"] = correlation_matrix_error(test, generated, idps)["frobenius"]
        shuffled = product_of_marginals(generated, idps, within="row", seed=args.seed)
        row["corr_pom"] = correlation_matrix_error(test, shuffled, idps)["frobenius"]
        row["corr_ratio"] = row["corr_err"] / row["corr_pom"] if row["corr_pom"] > 0 else math.nan
    return row


def _one_thread() -> None:
    """Pool workers: one BLAS/torch thread each, so ``--jobs`` processes share the cores without
    oversubscription."""
    import torch

    torch.set_num_threads(1)


def _job(job: tuple[int, str], cfg: dict, args) -> dict:
    """One (D, backbone) cell of the table; the cohort is rebuilt from its seeds, so cells are independent."""
    from normdiff_bids.data.synthetic import SyntheticCohort

    d, backbone = job
    cohort = SyntheticCohort(n_idps=d, n_sites=3, seed=args.seed)
    train = cohort.sample(cfg["n_train"], seed=args.seed + 1)
    test = cohort.sample(cfg["n_test"], seed=args.seed + 2)
    row = run_one(cohort, train, test, backbone, cfg, args)
    print(f"done D={d} {backbone}: fit {row['fit_s']:.0f}s, score {row['score_s']:.0f}s",
          file=sys.stderr, flush=True)
    return row


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (D in {2, 20}), a few minutes")
    parser.add_argument("--dims", help="comma-separated numbers of IDPs (default 2,20,100,200)")
    parser.add_argument("--backbones", default=",".join(BACKBONES), help="comma-separated backbones")
    parser.add_argument("--preset", choices=("default", "paper"), default="default",
                        help="estimator preset: the budgeted defaults or the paper's setting")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--n-train", type=int, help="reference subjects per cohort (default 6000)")
    parser.add_argument("--n-test", type=int, help="held-out subjects (default 1000)")
    parser.add_argument("--n-samples", type=int, help="draws per covariate point when scoring (default 200)")
    parser.add_argument("--n-generated", type=int, help="model draws per held-out subject for ACE and "
                        "correlations (default 10)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the estimator's budget)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the estimator's)")
    parser.add_argument("--lr", type=float, help="AdamW learning rate (default: the backbone's)")
    parser.add_argument("--history", help="write per-epoch losses to DIR/history_D<d>_<backbone>.csv")
    parser.add_argument("--batch-size", type=int, help="training batch (default: the estimator's)")
    parser.add_argument("--grid-step", type=float, help="scoring grid step in years (default 1; with "
                        "--quick the estimator's, age SD / 30); a coarser grid scores fewer covariate points")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run the (D, backbone) cells in this many processes of one thread each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", help="also write the table to this CSV file")
    parser.add_argument("--verbose", action="store_true", help="progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    cfg = dict(QUICK if args.quick else FULL)
    if args.dims:
        cfg["dims"] = tuple(int(v) for v in args.dims.split(","))
    for key in ("n_train", "n_test", "n_samples", "n_generated", "epochs", "steps", "grid_step"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]

    # Longest jobs first, so that with --jobs the pool ends together.
    jobs = sorted(((d, b) for d in cfg["dims"] for b in backbones),
                  key=lambda job: (job[0], job[1] == "saint"), reverse=True)
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_one_thread) as pool:
            rows = list(pool.map(_job, jobs, [cfg] * len(jobs), [args] * len(jobs)))
    else:
        rows = [_job(job, cfg, args) for job in jobs]
    rows.sort(key=lambda row: (row["D"], backbones.index(row["backbone"])))

    table = pd.DataFrame(rows)
    print(f"Dimension study on SyntheticCohort (N_train={cfg['n_train']}, n_test={cfg['n_test']}, "
          f"n_samples={cfg['n_samples']}, n_generated={cfg['n_generated']}, preset={args.preset}, "
          f"batch_size={args.batch_size or 'default'}, grid_step={cfg['grid_step'] or 'default'}, "
          f"device={args.device}, seed={args.seed})")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print("targets at D=200: cent_err <= {cent_err}, cov95_err <= {cov95_err}, "
          "corr_err <= {corr_ratio} x corr_pom".format(**TARGETS))
    if args.csv:
        from normdiff_bids.atomic import atomic_write_text

        atomic_write_text(args.csv, table.to_csv(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
