"""Evaluate a fitted normative model on held-out data with the full suite, pooled and by group."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd

from normdiff_bids.errors import InputError
from normdiff_bids.evaluation._common import ACE_CENTILES, require_columns
from normdiff_bids.evaluation.calibration import absolute_centile_error, centile_error
from normdiff_bids.evaluation.coverage import empirical_coverage
from normdiff_bids.evaluation.dependence import (
    correlation_matrix_error,
    pair_of_pair_comparison,
    pairwise_dependence,
)
from normdiff_bids.evaluation.fidelity import ks_by_age_bin
from normdiff_bids.evaluation.grouping import scalars
from normdiff_bids.evaluation.memorisation import balance_by_age_sex, memorisation_ratio
from normdiff_bids.evaluation.pit import pit_summary

#: Centiles drawn as curves in the calibration figures.
CURVE_CENTILES = ACE_CENTILES


def generated_table(model, covariates: pd.DataFrame, n_samples: int, idps: Sequence[str],
                    covariate_columns: Sequence[str], carry: Sequence[str] = ()) -> pd.DataFrame:
    """``model.sample`` at each row's covariates as a long table: ``row`` (source row), covariates, IDPs.

    Columns named in ``carry`` (e.g. a grouping column the model does not use) are copied along.
    """
    samples = np.asarray(model.sample(covariates[list(covariate_columns)], n_samples), dtype=np.float64)
    n_rows = len(covariates)
    if samples.ndim != 3 or samples.shape[0] != n_rows or samples.shape[2] != len(idps):
        raise InputError(f"model.sample returned shape {samples.shape}; expected "
                         f"[{n_rows}, n_samples, {len(idps)}] (rows, samples, IDPs)")
    s = samples.shape[1]
    source = np.repeat(np.arange(n_rows), s)
    keep = list(dict.fromkeys([*covariate_columns, *(c for c in carry if c in covariates.columns)]))
    out = covariates[keep].iloc[source].reset_index(drop=True)
    out.insert(0, "row", source)
    out = pd.concat([out, pd.DataFrame(samples.reshape(n_rows * s, len(idps)), columns=list(idps))], axis=1)
    return out


def _model_covariates(model, table: pd.DataFrame, covariates) -> list[str]:
    if covariates is None:
        covariates = getattr(model, "covariates", None) or ("age", "sex", "site")
        covariates = [c for c in covariates if c in table.columns]
    return list(covariates)


def _suite(holdout, generated, centiles, idps, *, train=None, memorisation_generated=None, truth=None,
           bin_width=1.0, n_permutations=500, max_pairs=300, max_rows=400, seed=0, with_pair_of_pair=True,
           age="age", sex="sex"):
    """Every metric on one (sub)population; returns (flat scalars, full per-metric results)."""
    full = {}
    flat = {"n_holdout": len(holdout)}
    full["ace"] = absolute_centile_error(holdout, generated, idps=idps, bin_width=bin_width, age=age)
    flat["ace"] = full["ace"]["ace"]
    flat["ace_noise_floor"] = full["ace"]["noise_floor"]
    if truth is not None:
        full["centile_error"] = centile_error(centiles, truth.loc[centiles.index], idps=idps)
        flat["centile_mae"] = full["centile_error"]["mean_abs_error"]
    full["coverage"] = empirical_coverage(centiles, idps=idps)
    flat["coverage95"] = full["coverage"]["coverage"]
    flat["coverage95_abs_error"] = full["coverage"]["abs_error"]
    flat["coverage95_max_abs_error"] = full["coverage"]["max_abs_error"]
    full["pit"] = pit_summary(centiles, idps=idps)
    flat["pit_ks"] = full["pit"]["ks"]
    flat["pit_ks_max"] = full["pit"]["ks_max"]
    flat.update(uniformity_limits(full["pit"]))
    full["ks"] = ks_by_age_bin(holdout, generated, idps=idps, bin_width=bin_width, age=age,
                               n_permutations=n_permutations, seed=seed)
    for key in ("mean_stat", "max_stat", "n_tests", "frac_reject", "frac_idps_fisher_reject"):
        flat[f"ks_{key}"] = full["ks"][key]
    if len(idps) >= 2:
        full["correlation"] = correlation_matrix_error(holdout, generated, idps=idps)
        flat["corr_frobenius"] = full["correlation"]["frobenius"]
        flat["corr_rms"] = full["correlation"]["rms"]
        flat["corr_noise_floor"] = full["correlation"]["noise_floor"]
        if len(holdout) >= 3:
            full["dependence"] = pairwise_dependence(holdout, generated, idps=idps, within="row",
                                                     max_pairs=max_pairs, max_rows=max_rows, seed=seed)
            for key in ("energy", "energy_pom", "energy_ratio", "mmd2", "mmd2_pom", "mmd2_ratio",
                        "frac_pairs_beat_pom", "n_pairs"):
                flat[f"dep_{key}"] = full["dependence"][key]
        if with_pair_of_pair:
            full["pair_of_pair"] = pair_of_pair_comparison(holdout, generated, idps=idps, seed=seed)
            flat["mantel_r"] = full["pair_of_pair"]["mantel_r"]
            flat["mantel_p"] = full["pair_of_pair"]["mantel_p"]
    if train is not None and memorisation_generated is not None and len(memorisation_generated):
        full["memorisation"] = memorisation_ratio(train, holdout, memorisation_generated, idps=idps,
                                                  bin_width=bin_width, age=age, sex=sex, seed=seed)
        mem = full["memorisation"]
        for key in ("median_ratio", "p05", "p95", "p_lt_1", "p_lt_0_8", "near_duplicate_rate"):
            flat[f"nn_{key}"] = mem[key]
        flat["nn_p_lt_1_ci_low"], flat["nn_p_lt_1_ci_high"] = mem["p_lt_1_ci"]
    return flat, full


def centile_curves(model, train: pd.DataFrame, covariate_columns: Sequence[str], idps: Sequence[str],
                   centiles: Sequence[float] = CURVE_CENTILES, n_ages: int = 60, age: str = "age",
                   sex: str = "sex", site: str = "site",
                   categorical: Sequence[str] | None = None) -> pd.DataFrame:
    """Model quantiles on an age grid over the training range, for each sex, at the most common site.

    Other covariates are held at the training median (continuous) or most common level (categorical:
    those named in ``categorical``, default the model's categorical covariates, else the non-numeric
    ones and ``site``). Returns a long DataFrame: ``sex``, ``site``, ``age``, ``idp``, ``q``, ``value``.
    """
    categorical = set(_categorical_covariates(model) if categorical is None else categorical)
    require_columns(train, [age], "train")
    grid_age = np.linspace(float(train[age].min()), float(train[age].max()), n_ages)
    sexes = sorted(pd.unique(train[sex].dropna()), key=str) if sex in covariate_columns else [None]
    rows = []
    for level in sexes:
        grid = pd.DataFrame({age: grid_age})
        for col in covariate_columns:
            if col == age:
                continue
            if col == sex:
                grid[col] = level
            elif col not in categorical and pd.api.types.is_numeric_dtype(train[col]) and col != site:
                grid[col] = float(train[col].median())
            else:
                grid[col] = train[col].mode().iloc[0]
        quantiles = model.predict_quantiles(grid[list(covariate_columns)], list(centiles))
        for name in idps:
            for q in centiles:
                rows.append(pd.DataFrame({
                    "sex": level, "site": grid[site].iloc[0] if site in grid else None, "age": grid_age,
                    "idp": name, "q": float(q), "value": np.asarray(quantiles[(name, q)], dtype=float)}))
    return pd.concat(rows, ignore_index=True)


def uniformity_limits(pit: dict) -> dict:
    """What a calibrated model stays within on this many held-out rows, for the report's verdicts.

    ``pit_ks_critical``: the 5% critical value of one KS test at ``n`` rows (``1.358 / sqrt(n)``); a
    calibrated model's mean per-IDP KS distance is about ``0.87 / sqrt(n)``, so the mean exceeds it only
    when typical IDPs are rejected. ``coverage95_tolerance``: 1.96 binomial SDs of one IDP's 95%
    coverage at ``n`` rows. ``pit_n_rejected``: IDPs whose KS test rejects uniformity at a 5% false
    discovery rate (Benjamini-Hochberg over IDPs).
    """
    from normdiff_bids.evaluation._common import benjamini_hochberg

    n = int(pit["per_idp"]["n"].max()) if len(pit["per_idp"]) else 0
    if n < 2:
        return {}
    q = benjamini_hochberg(pit["per_idp"]["p_value"].to_numpy())
    return {"pit_ks_critical": float(1.358 / np.sqrt(n)),
            "coverage95_tolerance": float(1.96 * np.sqrt(0.95 * 0.05 / n)),
            "pit_n_rejected": int(np.sum(q < 0.05)), "pit_n_idps": int(len(q))}


def _categorical_covariates(model) -> list[str]:
    """The model's categorical covariates as its schema has them (none known without a schema)."""
    schema = getattr(model, "covariate_schema_", None)
    return [c.name for c in getattr(schema, "categorical", None) or []]


def joint_calibration(model, holdout: pd.DataFrame) -> dict:
    """Uniformity of the held-out rows' joint deviation centiles: KS distance to U(0, 1), its 5% critical
    value for this many rows, and the shares above 0.95 and 0.99 (nominal 0.05 and 0.01)."""
    from scipy import stats

    scores = model.score(holdout.reset_index(drop=True))
    key = "participant_id" if "participant_id" in scores.columns else "row"
    joint = scores.groupby(key, sort=False)["joint_centile"].first().to_numpy(dtype=np.float64)
    joint = joint[np.isfinite(joint)]
    if len(joint) < 2:
        return {}
    out = {"joint_pit_ks": float(stats.kstest(joint, "uniform").statistic),
           "joint_pit_ks_critical": float(1.358 / np.sqrt(len(joint))),
           "joint_share_95": float(np.mean(joint > 0.95)), "joint_share_99": float(np.mean(joint > 0.99)),
           "joint_n": int(len(joint))}
    return {**out, **joint_source(model)}


def joint_source(model) -> dict:
    """What decides a model's joint centile: ``joint_from_draws`` (no joint map of the applied
    calibration layer corrects its draws' centile), ``n_networks`` (whose draws they are) and, where a
    joint map was learnt but too few unseen controls were left to check it, ``joint_unchecked_controls``
    (how many there were); empty for a model that does not say (e.g. an oracle)."""
    calibrated = getattr(model, "_calibrated", None)
    if not callable(calibrated) or not hasattr(model, "n_networks"):
        return {}
    layer = calibrated()
    out = {"joint_from_draws": layer is None or layer.joint.is_identity, "n_networks": int(model.n_networks)}
    correction = getattr(layer, "joint_correction", None) or {}
    if not out["joint_from_draws"] and correction.get("applied") is False:
        out["joint_unchecked_controls"] = int(correction.get("n_unseen", 0))
    return out


def evaluate(model, train: pd.DataFrame, holdout: pd.DataFrame, n_samples: int = 200, seed: int = 0,
             idps: Sequence[str] | None = None, covariates: Sequence[str] | None = None,
             truth: pd.DataFrame | None = None, group_by: Sequence[str] = ("sex", "site"),
             min_group_rows: int = 20, bin_width: float = 1.0, n_permutations: int = 500,
             max_pairs: int = 300, max_rows: int = 400, curves: bool = True, age: str = "age",
             sex: str = "sex", site: str = "site") -> dict:
    """Evaluate a fitted model on held-out data with the full calibration and fidelity suite.

    The model needs ``sample(covariates, n) -> [R, S, D]``, ``predict_centiles(table)`` and, for the
    centile-curve figure, ``predict_quantiles(covariates, q)`` (the :class:`NormativeDiffusion` API).
    Generated data are ``n_samples`` draws at each held-out row's covariates; memorisation uses one draw
    at each row of the age x sex balanced train and held-out sets (half each, so neither is favoured).

    Parameters
    ----------
    truth : optional DataFrame of true centiles of the held-out rows (synthetic data), adds ``centile_mae``.
    group_by : covariates to repeat every metric within (levels with fewer than ``min_group_rows``
        held-out rows are listed with their ``n`` only).
    age, sex, site : the columns of the age (bins of ACE, KS and memorisation; axis of the centile
        curves), sex (memorisation balance; one centile curve per level) and site (the curves' site).

    Returns
    -------
    dict: the headline scalars at top level (``ace``, ``ace_noise_floor``, ``coverage95``,
    ``coverage95_abs_error``, ``pit_ks``, ``ks_*``, ``corr_frobenius``, ``corr_rms``, ``dep_*``,
    ``mantel_r``, ``nn_*``, ``centile_mae`` with ``truth``, ``n_*``, timings), plus ``per_idp``
    (DataFrame), ``groups`` (``{covariate: DataFrame of scalars per level}``), ``tables`` (full result of
    each metric, the centile curves and the held-out table, for figures) and ``config``.
    """
    idps = list(idps) if idps is not None else list(getattr(model, "idps_", []) or [])
    if not idps:
        raise InputError("no IDPs to evaluate: pass idps=[...] or a fitted model with idps_")
    covariate_columns = _model_covariates(model, holdout, covariates)
    require_columns(holdout, [*covariate_columns, *idps], "holdout")
    require_columns(train, [*covariate_columns, *idps], "train")
    if n_samples < 1:
        raise InputError(f"n_samples must be at least 1, got {n_samples}")
    holdout = holdout.reset_index(drop=True)
    if truth is not None:
        truth = truth.reset_index(drop=True)

    t0 = time.perf_counter()
    centiles = model.predict_centiles(holdout[[*covariate_columns, *idps]])
    score_seconds = time.perf_counter() - t0
    centiles = pd.DataFrame(np.asarray(centiles[idps], dtype=np.float64), columns=idps, index=holdout.index)
    t0 = time.perf_counter()
    carry = [c for c in group_by if c in holdout.columns]
    generated = generated_table(model, holdout, n_samples, idps, covariate_columns, carry)
    sample_seconds = time.perf_counter() - t0

    memorisation_generated = None
    if age in train.columns and sex in train.columns:
        train_bal, hold_bal = balance_by_age_sex(train, holdout, bin_width=bin_width, age=age, sex=sex,
                                                 seed=seed)
        keep = list(dict.fromkeys([*covariate_columns, *carry]))
        reference = pd.concat([train_bal[keep], hold_bal[keep]], ignore_index=True)
        memorisation_generated = generated_table(model, reference, 1, idps, covariate_columns, carry)

    flat, full = _suite(holdout, generated, centiles, idps, train=train,
                        memorisation_generated=memorisation_generated, truth=truth, bin_width=bin_width,
                        n_permutations=n_permutations, max_pairs=max_pairs, max_rows=max_rows, seed=seed,
                        age=age, sex=sex)

    groups = {}
    for by in group_by:
        if by not in holdout.columns:
            continue
        rows = {}
        for level in sorted(pd.unique(holdout[by].dropna()), key=str):
            mask = (holdout[by] == level).to_numpy()
            if mask.sum() < min_group_rows:
                rows[str(level)] = {"n_holdout": int(mask.sum())}
                continue
            gen_sub = generated[(generated[by] == level).to_numpy()]
            mem_sub = None
            if memorisation_generated is not None:
                mem_sub = memorisation_generated[memorisation_generated[by] == level]
            try:
                rows[str(level)], _ = _suite(
                    holdout[mask], gen_sub, centiles[mask], idps, train=train[train[by] == level],
                    memorisation_generated=mem_sub, truth=None if truth is None else truth[mask],
                    bin_width=bin_width, n_permutations=n_permutations, max_pairs=max_pairs,
                    max_rows=max_rows, seed=seed, with_pair_of_pair=False, age=age, sex=sex)
            except ValueError as exc:
                rows[str(level)] = {"n_holdout": int(mask.sum()), "error": str(exc).splitlines()[0]}
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = by
        groups[by] = table

    per_idp = pd.DataFrame({
        "ace": full["ace"]["per_idp"]["ace"],
        "ace_noise_floor": full["ace"]["per_idp"]["noise_floor"],
        "coverage95": full["coverage"]["per_idp"]["coverage"],
        "pit_ks": full["pit"]["per_idp"]["ks"],
        "ks_mean_stat": full["ks"]["per_idp"]["mean_stat"],
        "ks_fisher_p": full["ks"]["per_idp"]["fisher_p"],
    })
    if "centile_error" in full:
        per_idp["centile_mae"] = full["centile_error"]["per_idp"]["mean"]

    tables = dict(full)
    tables["holdout"] = holdout[[*covariate_columns, *idps]]
    tables["centiles"] = centiles
    if curves and hasattr(model, "predict_quantiles"):
        tables["centile_curves"] = centile_curves(model, train, covariate_columns, idps, age=age, sex=sex,
                                                  site=site)

    results = {**flat, "n_train": len(train), "n_samples": n_samples, "n_idps": len(idps),
               "score_seconds": score_seconds, "sample_seconds": sample_seconds}
    if hasattr(model, "score") and len(idps) > 1:
        results.update(joint_calibration(model, holdout[[*covariate_columns, *idps]]))
    results.update({
        "per_idp": per_idp,
        "groups": groups,
        "tables": tables,
        "config": {"seed": seed, "bin_width": bin_width, "n_permutations": n_permutations,
                   "max_pairs": max_pairs, "max_rows": max_rows, "min_group_rows": min_group_rows,
                   "covariates": covariate_columns, "idps": idps, "n_samples": n_samples},
    })
    return results


def summary(results: dict) -> dict:
    """JSON-safe summary of :func:`evaluate` results: scalars, per-IDP and per-group tables, config."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    def records(frame: pd.DataFrame) -> dict:
        return {str(k): {c: clean(scalars({c: v}).get(c)) for c, v in row.items()}
                for k, row in frame.to_dict(orient="index").items()}

    return {
        "metrics": {k: clean(v) for k, v in scalars(results).items()},
        "per_idp": records(results["per_idp"]),
        "groups": {by: records(table) for by, table in results["groups"].items()},
        "config": results["config"],
    }
