"""Per-subject calibration of NormativeDiffusion on the synthetic ground truth, per sampler setting.

For each cohort size (D IDPs) one model is fitted with the package defaults; each sampler setting then
scores the same held-out subjects, and the centiles are compared with the exact conditional centiles of
:class:`~normdiff_bids.data.synthetic.SyntheticCohort`. The Monte Carlo floor is the same statistic for
an oracle that draws ``n_samples`` from the true distribution. Prints one table.

    python benchmarks/calibration.py            # D=4 and D=20, N_train=6000, 1000 test subjects
    python benchmarks/calibration.py --quick    # small sizes, a minute or two
    python benchmarks/calibration.py --direct   # diffusion settings compared with a bare training loop

``--direct`` isolates the diffusion process and sampler from the estimator: one FiLM-MLP per diffusion
setting trained by a small fixed loop (docs/method.md section 4 records its numbers), each scored with
several samplers on the same noise.

Columns: ``pooled`` = mean |model centile - true centile| over subjects and IDPs; ``worst_sex`` /
``worst_site`` = the same within each sex / site, worst group; ``cov95_err`` = |fraction of values inside
the model's central 95% interval - 0.95|; ``score_s`` = wall time of scoring the test subjects.
Targets with the default setting: pooled <= 0.03, every group <= 0.04, cov95_err <= 0.02.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pandas as pd
import torch

from normdiff_bids.data.synthetic import SyntheticCohort
from normdiff_bids.scoring import empirical_centiles

TARGETS = {"pooled": 0.03, "worst_group": 0.04, "cov95_err": 0.02}


def calibration_stats(centiles: np.ndarray, true: np.ndarray, covariates: pd.DataFrame) -> dict:
    """Calibration of model centiles ``[R, D]`` against the true centiles, pooled and per group."""
    err = np.abs(centiles - true)
    by_sex = [err[(covariates["sex"] == s).to_numpy()].mean() for s in sorted(covariates["sex"].unique())]
    by_site = [err[(covariates["site"] == s).to_numpy()].mean() for s in sorted(covariates["site"].unique())]
    inside = (centiles > 0.025) & (centiles < 0.975)
    return {"pooled": err.mean(), "worst_sex": max(by_sex), "worst_site": max(by_site),
            "worst_group": max(by_sex + by_site), "cov95_err": abs(inside.mean() - 0.95)}


def sampler_settings(quick: bool) -> list[tuple[str, str | None, int | None]]:
    """(label, sampler, steps); ``None`` means the model's default."""
    if quick:
        return [("default", None, None), ("dpmpp2m-10", "dpmpp2m", 10)]
    return [("default", None, None), ("ddpm-100", "ddpm", 100), ("ddpm-50 (respaced)", "ddpm", 50),
            ("ddim-20", "ddim", 20), ("dpmpp2m-10", "dpmpp2m", 10), ("dpmpp2m-20", "dpmpp2m", 20),
            ("dpmpp2m-sde-20", "dpmpp2m-sde", 20), ("dpmpp2m-sde-40", "dpmpp2m-sde", 40)]


def run(n_idps: int, args, settings) -> list[dict]:
    from normdiff_bids import NormativeDiffusion

    gen = SyntheticCohort(n_idps=n_idps, n_sites=3, seed=args.seed)
    train = gen.sample(args.n_train, seed=args.seed + 1)
    test = gen.sample(args.n_test, seed=args.seed + 2)
    true = gen.cdf(test).to_numpy()
    rows = []

    oracle = gen.sample_idps(test, args.n_samples, seed=args.seed + 3)
    c_oracle, _ = empirical_centiles(test[gen.idps].to_numpy(), oracle)
    rows.append({"D": n_idps, "setting": "oracle (MC floor)", **calibration_stats(c_oracle, true, test),
                 "fit_s": np.nan, "score_s": np.nan})

    model = NormativeDiffusion(seed=args.seed, n_samples=args.n_samples, epochs=args.epochs, verbose=False,
                               device=args.device)
    t0 = time.perf_counter()
    model.fit(train, idps=gen.idps)
    fit_s = time.perf_counter() - t0
    default_label = f"{model._sampler()}-{model._steps()}"
    for label, sampler, steps in settings:
        model.set_params(sampler=sampler, steps=steps)
        t0 = time.perf_counter()
        centiles = model.predict_centiles(test)[gen.idps].to_numpy()
        score_s = time.perf_counter() - t0
        if label == "default":
            label = f"default ({default_label})"
        rows.append({"D": n_idps, "setting": label, **calibration_stats(centiles, true, test),
                     "fit_s": fit_s, "score_s": score_s})
    return rows


#: (label, DiffusionConfig overrides, [(sampler, steps, ddpm_variance)]) compared by ``--direct``.
DIRECT_SETTINGS = [
    ("VP linear T=100 eps x0_clip=10 (reference)", {"x0_clip": 10.0},
     [("ddpm", 100, "posterior"), ("ddpm", 100, "forward"), ("ddim", 20, None), ("dpmpp2m", 20, None),
      ("dpmpp2m-sde", 20, None)]),
    ("VP linear T=100 v", {"prediction": "v"}, [("dpmpp2m", 10, None), ("dpmpp2m", 20, None)]),
    ("VP cosine T=1000 v", {"schedule": "cosine", "timesteps": 1000, "prediction": "v"},
     [("dpmpp2m", 10, None), ("dpmpp2m", 20, None), ("dpmpp2m-sde", 20, None), ("ddim", 20, None),
      ("ddpm", 100, "forward")]),
    ("EDM", {"process": "edm"}, [("dpmpp2m", 20, None), ("dpmpp2m", 30, None), ("dpmpp2m-sde", 30, None)]),
]


def run_direct(n_idps: int, args) -> list[dict]:
    """Train one FiLM-MLP per diffusion setting with a fixed small loop and score each sampler."""
    import copy

    from normdiff_bids.model.backbones import FiLMMLP, preset_config
    from normdiff_bids.model.diffusion import GaussianDiffusion, augment_inputs
    from normdiff_bids.model.schedule import DiffusionConfig

    torch.set_num_threads(args.threads)
    gen = SyntheticCohort(n_idps=n_idps, n_sites=3, seed=args.seed)
    train = gen.sample(args.n_train, seed=args.seed + 1)
    test = gen.sample(args.n_test, seed=args.seed + 2)
    true, values = gen.cdf(test).to_numpy(), test[gen.idps].to_numpy()
    y = train[gen.idps].to_numpy()
    mu, sd = y.mean(0), y.std(0)
    age_mu, age_sd = train["age"].mean(), train["age"].std()

    def encode(t):
        site = np.stack([(t["site"] == s).to_numpy() for s in gen.sites], 1)
        cols = np.column_stack([(t["age"] - age_mu) / age_sd, (t["sex"] == "M").to_numpy(), site])
        return torch.tensor(cols.astype(np.float32))

    x_train, c_train, c_test = torch.tensor((y - mu) / sd, dtype=torch.float32), encode(train), encode(test)
    oracle = gen.sample_idps(test, args.n_samples, seed=args.seed + 3)
    width_oracle = np.percentile(oracle, 97.5, axis=1) - np.percentile(oracle, 2.5, axis=1)
    c_oracle, _ = empirical_centiles(values, oracle)
    rows = [{"D": n_idps, "setting": "oracle (MC floor)", **calibration_stats(c_oracle, true, test),
             "width95_ratio": 1.0, "fit_s": np.nan, "score_s": np.nan}]
    settings = DIRECT_SETTINGS[2:3] if args.quick else DIRECT_SETTINGS
    for label, overrides, samplers in settings:
        torch.manual_seed(args.seed)
        diffusion = GaussianDiffusion(DiffusionConfig(**overrides))
        net = FiLMMLP(n_idps, c_train.shape[1], preset_config("film-mlp", args.preset))
        ema = copy.deepcopy(net)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=args.train_steps,
                                                    pct_start=0.05)
        g = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        for step in range(args.train_steps):
            idx = torch.randint(0, len(x_train), (args.batch,), generator=g)
            x0 = augment_inputs(x_train[idx], generator=g) if step % 2 else x_train[idx]
            loss = diffusion.training_loss(net, x0, c_train[idx], generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                decay = min(0.999, (1 + step) / (10 + step))
                for p_ema, p in zip(ema.parameters(), net.parameters()):
                    p_ema.mul_(decay).add_(p, alpha=1 - decay)
                for b_ema, b in zip(ema.buffers(), net.buffers()):
                    b_ema.copy_(b)
        fit_s = time.perf_counter() - t0
        for sampler, steps, variance in samplers:
            run_diff = diffusion
            if variance is not None:
                run_diff = GaussianDiffusion(DiffusionConfig(**overrides, ddpm_variance=variance))
            noise = torch.randn(run_diff.noise_draws(sampler, steps), args.n_test, args.n_samples, n_idps,
                                generator=torch.Generator().manual_seed(args.seed + 5))
            t0 = time.perf_counter()
            x = run_diff.sample(ema, c_test, noise, sampler=sampler, steps=steps).double().numpy()
            score_s = time.perf_counter() - t0
            samples = x * sd + mu
            width = np.percentile(samples, 97.5, axis=1) - np.percentile(samples, 2.5, axis=1)
            centiles, _ = empirical_centiles(values, samples)
            name = f"{label}: {sampler}-{steps}" + (f" ({variance} var.)" if variance else "")
            rows.append({"D": n_idps, "setting": name, **calibration_stats(centiles, true, test),
                         "width95_ratio": float(np.median(width / width_oracle)), "fit_s": fit_s,
                         "score_s": score_s})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute or two)")
    parser.add_argument("--d", type=int, nargs="+", default=None, help="numbers of IDPs (default 4 20)")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--n-samples", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="None: the estimator's own budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--direct", action="store_true",
                        help="compare diffusion settings with a bare training loop instead of the estimator")
    parser.add_argument("--train-steps", type=int, default=None, help="--direct: optimiser steps")
    parser.add_argument("--batch", type=int, default=256, help="--direct: batch size")
    parser.add_argument("--preset", default="default", help="--direct: FiLM-MLP preset")
    parser.add_argument("--threads", type=int, default=1, help="--direct: torch threads")
    parser.add_argument("--settings", nargs="+", default=None,
                        help="sampler settings to score, by label (default: all), e.g. default ddim-20")
    args = parser.parse_args(argv)
    os.environ.setdefault("NORMDIFF_QUIET", "1")
    if args.direct:
        defaults = (dict(d=[4], n_train=1000, n_test=50, n_samples=200, train_steps=300) if args.quick else
                    dict(d=[10], n_train=6000, n_test=100, n_samples=300, train_steps=2500))
    elif args.quick:
        defaults = dict(d=[4], n_train=1000, n_test=60, n_samples=100, epochs=10)
    else:
        defaults = dict(d=[4, 20], n_train=6000, n_test=1000, n_samples=1000, epochs=None)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    settings = sampler_settings(args.quick)
    if args.settings:
        unknown = sorted(set(args.settings) - {label for label, _, _ in settings})
        if unknown:
            parser.error(f"unknown --settings {unknown}; choose from {[s[0] for s in settings]}")
        settings = [s for s in settings if s[0] in args.settings]
    rows = []
    for d in args.d:
        rows.extend(run_direct(d, args) if args.direct else run(d, args, settings))
    table = pd.DataFrame(rows)
    print(f"Calibration against exact centiles: N_train={args.n_train}, {args.n_test} test subjects, "
          f"3 sites, n_samples={args.n_samples}, seed={args.seed}"
          f"{' (quick)' if args.quick else ''}{', direct training loop' if args.direct else ''}")
    print(f"Targets (default setting): pooled <= {TARGETS['pooled']}, worst group <= "
          f"{TARGETS['worst_group']}, cov95_err <= {TARGETS['cov95_err']}")
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
