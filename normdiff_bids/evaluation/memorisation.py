"""Memorisation check: are generated samples closer to the training set than to equally sized held-out data?
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.neighbors import NearestNeighbors

from normdiff_bids.errors import InputError
from normdiff_bids.evaluation._common import (
    age_bin,
    idp_values,
    require_columns,
    resolve_idps,
    wilson_interval,
)

#: A generated sample this close to a training row (in train-standardised units) is a near-duplicate.
NEAR_DUPLICATE_DISTANCE = 1e-6


def _cell_keys(table: pd.DataFrame, bin_width: float, age: str, sex: str) -> pd.Series:
    bins = age_bin(table[age].to_numpy(dtype=np.float64, na_value=np.nan), bin_width)
    return pd.Series(bins, index=table.index).astype(str) + "|" + table[sex].astype(str)


def balance_by_age_sex(train: pd.DataFrame, holdout: pd.DataFrame, bin_width: float = 1.0, age: str = "age",
                       sex: str = "sex", seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Subsample train and holdout to the same number of rows in every (age bin x sex) cell.

    Each cell keeps min(n_train, n_holdout) rows of each table (seeded), so nearest-neighbour distances
    to the two sets are comparable: a set that is larger or denser at some ages would otherwise look
    closer for reasons unrelated to memorisation.
    """
    require_columns(train, [age, sex], "train")
    require_columns(holdout, [age, sex], "holdout")
    rng = np.random.default_rng(seed)
    train_keys = _cell_keys(train, bin_width, age, sex).to_numpy()
    hold_keys = _cell_keys(holdout, bin_width, age, sex).to_numpy()
    train_groups = pd.Series(np.arange(len(train))).groupby(train_keys).indices
    hold_groups = pd.Series(np.arange(len(holdout))).groupby(hold_keys).indices
    keep_train, keep_hold = [], []
    for cell in sorted(set(train_groups) & set(hold_groups)):
        t_idx, h_idx = train_groups[cell], hold_groups[cell]
        k = min(len(t_idx), len(h_idx))
        keep_train.append(rng.choice(t_idx, size=k, replace=False))
        keep_hold.append(rng.choice(h_idx, size=k, replace=False))
    if not keep_train:
        raise InputError("train and holdout share no (age bin x sex) cell; memorisation cannot be balanced "
                         f"(age bin width {bin_width} years)")
    return (train.iloc[np.sort(np.concatenate(keep_train))],
            holdout.iloc[np.sort(np.concatenate(keep_hold))])


def memorisation_ratio(train: pd.DataFrame, holdout: pd.DataFrame, generated: pd.DataFrame,
                       idps: Sequence[str] | None = None, bin_width: float = 1.0, age: str = "age",
                       sex: str = "sex", max_generated: int | None = 5000, seed: int = 0) -> dict:
    """Nearest-neighbour distance ratio r = d_NN(train) / d_NN(holdout) for each generated sample.

    Train and holdout are first balanced by (age bin x sex) (:func:`balance_by_age_sex`, seeded), then
    all three tables are standardised with the train mean and SD of each IDP; distances are Euclidean
    over IDPs only (covariates are not part of the distance). A model that does not memorise draws
    samples as close to unseen people as to training people: median r near 1 and P[r < 1] near 0.5.
    A model that copies training rows gives r near 0 and a positive near-duplicate rate.

    Returns
    -------
    dict with ``median_ratio``, ``p05``, ``p95``, ``p_lt_1`` and its 95% Wilson interval ``p_lt_1_ci``,
    ``p_lt_0_8``, ``near_duplicate_rate`` (P[d_train <= 1e-6]), ``n_generated``, ``n_reference`` (rows in
    each balanced set) and ``ratios`` (the per-sample ratios, for the histogram).
    """
    idps = resolve_idps(train, holdout, generated, idps=idps, names=("train", "holdout", "generated"))
    train_bal, hold_bal = balance_by_age_sex(train, holdout, bin_width, age, sex, seed)
    rng = np.random.default_rng(seed)
    t = idp_values(train, idps)
    mean, sd = np.nanmean(t, axis=0), np.nanstd(t, axis=0)
    sd = np.where(sd > 0, sd, 1.0)

    def standardised(table, name):
        values = (idp_values(table, idps) - mean) / sd
        complete = ~np.isnan(values).any(axis=1)
        if not complete.any():
            raise InputError(f"{name}: no row has all {len(idps)} IDPs; memorisation needs complete rows")
        return values[complete]

    t_std = standardised(train_bal, "train")
    h_std = standardised(hold_bal, "holdout")
    g_std = standardised(generated, "generated")
    if max_generated is not None and len(g_std) > max_generated:
        g_std = g_std[rng.choice(len(g_std), size=max_generated, replace=False)]
    d_train = NearestNeighbors(n_neighbors=1).fit(t_std).kneighbors(g_std)[0][:, 0]
    d_hold = NearestNeighbors(n_neighbors=1).fit(h_std).kneighbors(g_std)[0][:, 0]
    # A sample that coincides with a held-out row (d_hold = 0) is not memorisation; the ratio is then
    # 0/0 or x/0, so floor the denominator at the near-duplicate distance.
    ratios = d_train / np.maximum(d_hold, NEAR_DUPLICATE_DISTANCE)
    n = len(ratios)
    below_one = int(np.sum(ratios < 1))
    return {
        "median_ratio": float(np.median(ratios)),
        "p05": float(np.quantile(ratios, 0.05)),
        "p95": float(np.quantile(ratios, 0.95)),
        "p_lt_1": below_one / n,
        "p_lt_1_ci": wilson_interval(below_one, n),
        "p_lt_0_8": float(np.mean(ratios < 0.8)),
        "near_duplicate_rate": float(np.mean(d_train <= NEAR_DUPLICATE_DISTANCE)),
        "n_generated": n,
        "n_reference": len(t_std),
        "ratios": ratios,
    }
