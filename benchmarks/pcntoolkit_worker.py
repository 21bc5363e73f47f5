"""Fit PCNtoolkit's BLR on a train table and write centiles, quantiles and samples for a test table.

Runs inside a separate environment that has ``pcntoolkit`` installed (it needs pymc, pytensor, numba and
xarray, which normdiff-bids does not depend on), so ``benchmarks/peers.py`` calls it as a subprocess:

    /path/to/bench-venv/bin/python benchmarks/pcntoolkit_worker.py WORK_DIR

WORK_DIR holds ``train.csv``, ``test.csv`` and ``config.json``; this script writes ``result.npz``
(centiles [R, D], quantiles [R, Q, D], samples [R, S, D], fit and score seconds).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats


def _norm_data(name, table, covariates, batch_effects, idps):
    from pcntoolkit import NormData

    frame = table.copy()
    frame["_subject"] = np.arange(len(frame))
    for be in batch_effects:
        frame[be] = frame[be].astype(str)
    return NormData.from_dataframe(name, frame, covariates=list(covariates),
                                   batch_effects=list(batch_effects), response_vars=list(idps),
                                   subject_ids="_subject")


def main(work_dir: str) -> None:
    work = Path(work_dir)
    config = json.loads((work / "config.json").read_text())
    train = pd.read_csv(work / "train.csv")
    test = pd.read_csv(work / "test.csv")
    idps = config["idps"]
    covariates = config["covariates"]          # continuous, e.g. ["age"]
    batch_effects = config["batch_effects"]    # categorical, e.g. ["sex", "site"]
    levels = np.asarray(config["quantile_levels"], dtype=float)
    n_samples = int(config["n_samples"])
    # PCNtoolkit draws its synthetic data from the global NumPy generator.
    np.random.seed(int(config["seed"]))  # noqa: NPY002

    from pcntoolkit import BLR, BsplineBasisFunction, NormativeModel

    # The configuration of PCNtoolkit's own BLR tutorial: cubic B-spline in age for mean and variance,
    # site/sex random-intercept-like fixed effects in mean and variance, optional sinh-arcsinh warp.
    blr = BLR(
        name="template",
        fixed_effect=True,
        heteroskedastic=True,
        fixed_effect_var=True,
        warp_name=config.get("warp") or None,
        warp_reparam=bool(config.get("warp")),
        basis_function_mean=BsplineBasisFunction(degree=3, nknots=5),
        basis_function_var=BsplineBasisFunction(degree=3, nknots=5),
        n_iter=int(config.get("n_iter", 300)),
    )
    save_dir = tempfile.mkdtemp(prefix="pcn_", dir=work)
    model = NormativeModel(blr, savemodel=False, evaluate_model=False, saveresults=False, saveplots=False,
                           save_dir=save_dir, inscaler="standardize", outscaler="standardize")
    train_data = _norm_data("train", train, covariates, batch_effects, idps)
    t0 = time.perf_counter()
    model.fit(train_data)
    fit_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    test_data = _norm_data("test", test, covariates, batch_effects, idps)
    model.compute_zscores(test_data)
    z = test_data["Z"].sel(response_vars=idps).values
    centiles = stats.norm.cdf(z)
    score_s = time.perf_counter() - t0

    quant_data = _norm_data("test_q", test, covariates, batch_effects, idps)
    model.compute_centiles(quant_data, centiles=levels)
    quantiles = quant_data["centiles"].sel(response_vars=idps).values          # [Q, R, D]
    quantiles = np.transpose(quantiles, (1, 0, 2))

    # Samples: the model's own inverse map applied to standard-normal draws at each test row,
    # S copies of the test covariates at a time.
    repeated = test.loc[test.index.repeat(n_samples)].reset_index(drop=True)
    sample_data = _norm_data("test_s", repeated, covariates, batch_effects, idps)
    synth = model.synthesize(sample_data)
    samples = synth["Y"].sel(response_vars=idps).values.reshape(len(test), n_samples, len(idps))

    np.savez(work / "result.npz", centiles=centiles, quantiles=quantiles, samples=samples,
             fit_s=fit_s, score_s=score_s)

    # Transfer jobs (benchmarks/transfer.py): adapt the fitted model to a new site with
    # transfer_<i>_adapt.csv and score transfer_<i>_test.csv with the transferred model.
    for i in range(int(config.get("n_transfers", 0))):
        adapt = pd.read_csv(work / f"transfer_{i}_adapt.csv")
        target = pd.read_csv(work / f"transfer_{i}_test.csv")
        t0 = time.perf_counter()
        moved = model.transfer(_norm_data(f"adapt{i}", adapt, covariates, batch_effects, idps),
                               save_dir=tempfile.mkdtemp(prefix=f"transfer{i}_", dir=work))
        adapt_s = time.perf_counter() - t0
        target_data = _norm_data(f"target{i}", target, covariates, batch_effects, idps)
        moved.compute_zscores(target_data)
        z_t = target_data["Z"].sel(response_vars=idps).values
        np.savez(work / f"transfer_{i}.npz", centiles=stats.norm.cdf(z_t), adapt_s=adapt_s)


if __name__ == "__main__":
    os.environ.setdefault("PYTENSOR_FLAGS", "cxx=")
    main(sys.argv[1])
