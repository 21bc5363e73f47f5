"""Dependence between IDPs: pairwise energy distance and MMD^2 against a product-of-marginals baseline,
correlation-matrix error, and the pair-of-pair density-shape comparison (Mantel r)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np
import pandas as pd

from normdiff_bids.errors import InputError
from normdiff_bids.evaluation._common import idp_values, resolve_idps

#: IDP pairs processed together; bounds memory at about chunk * rows^2 float64 values per matrix.
_PAIR_CHUNK = 16


def product_of_marginals(table: pd.DataFrame, idps: Sequence[str] | None = None, within: str | None = None,
                         seed: int = 0) -> pd.DataFrame:
    """Copy of ``table`` with each IDP column shuffled independently (within groups of ``within``).

    Shuffling keeps every marginal and destroys the dependence between IDPs. With ``within`` naming a
    column that identifies the conditioning covariates (e.g. the held-out row a generated sample belongs
    to), the result is a draw from the product of the *conditional* marginals: what a per-IDP normative
    model would produce.
    """
    idps = resolve_idps(table, idps=idps, names=("table",))
    rng = np.random.default_rng(seed)
    n = len(table)
    if within is None:
        groups = np.zeros(n, dtype=np.int64)
    else:
        if within not in table.columns:
            raise InputError(f"table has no column {within!r} to shuffle within; "
                             "pass within=None or an existing column")
        groups = pd.factorize(table[within])[0]
    grouped = np.argsort(groups, kind="stable")
    values = idp_values(table, idps)
    shuffled = np.empty_like(values)
    for j in range(values.shape[1]):
        perm = np.lexsort((rng.random(n), groups))
        shuffled[grouped, j] = values[perm, j]
    out = table.copy()
    out[list(idps)] = shuffled
    return out


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared distances between 2-D points for a chunk of pairs: [c, n, 2], [c, m, 2] -> [c, n, m]."""
    d0 = a[:, :, None, 0] - b[:, None, :, 0]
    d1 = a[:, :, None, 1] - b[:, None, :, 1]
    return d0 * d0 + d1 * d1


def _offdiag_mean(d: np.ndarray) -> np.ndarray:
    n = d.shape[-1]
    return (d.sum(axis=(-2, -1)) - np.einsum("cii->c", d)) / (n * (n - 1))


class _PairSample:
    """One sample's within-sample distance terms for a chunk of pairs, reused against several others."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self.sq = _sq_distances(x, x)
        self.mean_dist = _offdiag_mean(np.sqrt(self.sq))


def _median_bandwidth(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, n_points: int = 200):
    """Median pooled inter-point distance per pair (the median heuristic), on a subsample of points."""
    pooled = np.concatenate([x, y], axis=1)
    if pooled.shape[1] > n_points:
        pooled = pooled[:, rng.choice(pooled.shape[1], size=n_points, replace=False)]
    iu = np.triu_indices(pooled.shape[1], 1)
    sigma = np.median(np.sqrt(_sq_distances(pooled, pooled)[:, iu[0], iu[1]]), axis=1)
    return np.where(sigma > 0, sigma, 1.0)


def _energy_and_mmd(ref: _PairSample, y: np.ndarray, rng: np.random.Generator):
    """Energy distance and unbiased MMD^2 (RBF kernel, median-heuristic bandwidth) per pair.

    ref holds x [c, n, 2]; y is [c, m, 2]. Energy distance: 2 E|X - Y| - E|X - X'| - E|Y - Y'|.
    """
    x = ref.x
    sq_xy = _sq_distances(x, y)
    sq_yy = _sq_distances(y, y)
    energy = 2 * np.sqrt(sq_xy).mean(axis=(1, 2)) - ref.mean_dist - _offdiag_mean(np.sqrt(sq_yy))
    gamma = (1.0 / (2.0 * _median_bandwidth(x, y, rng) ** 2))[:, None, None]
    mmd2 = (_offdiag_mean(np.exp(-gamma * ref.sq)) + _offdiag_mean(np.exp(-gamma * sq_yy))
            - 2 * np.exp(-gamma * sq_xy).mean(axis=(1, 2)))
    return energy, mmd2


def _complete_rows(values: np.ndarray, max_rows: int | None, rng: np.random.Generator) -> np.ndarray:
    values = values[~np.isnan(values).any(axis=1)]
    if max_rows is not None and values.shape[0] > max_rows:
        values = values[rng.choice(values.shape[0], size=max_rows, replace=False)]
    return values


def select_pairs(n_idps: int, max_pairs: int | None = None, seed: int = 0) -> np.ndarray:
    """Index pairs (i < j) of ``n_idps`` IDPs; a seeded random subset of ``max_pairs`` when there are more."""
    pairs = np.array(list(combinations(range(n_idps), 2)), dtype=np.int64).reshape(-1, 2)
    if max_pairs is not None and len(pairs) > max_pairs:
        keep = np.sort(np.random.default_rng(seed).choice(len(pairs), size=max_pairs, replace=False))
        pairs = pairs[keep]
    return pairs


def pairwise_dependence(real: pd.DataFrame, generated: pd.DataFrame, idps: Sequence[str] | None = None,
                        product: pd.DataFrame | None = None, within: str | None = None,
                        max_pairs: int | None = 300, max_rows: int | None = 400, seed: int = 0) -> dict:
    """Per IDP pair: energy distance and MMD^2 between real and generated standardised pairs, and the same
    statistics for a product-of-marginals sample.

    IDPs are standardised with the real data's mean and SD. A pair where the model beats the
    product-of-marginals baseline (``energy < energy_pom``) carries dependence the marginals alone miss.
    Rows with a missing IDP are dropped; each sample is subsampled to ``max_rows`` rows and, when there
    are more than ``max_pairs`` pairs (D=200 has 19,900), a random subset of pairs is used; both draws
    are seeded by ``seed`` (reported as ``seed``).

    Parameters
    ----------
    product : the product-of-marginals sample; by default ``product_of_marginals(generated, within=within)``.

    Returns
    -------
    dict with ``energy``, ``energy_pom``, ``energy_ratio`` (mean energy / mean energy_pom), ``mmd2``,
    ``mmd2_pom``, ``mmd2_ratio``, ``frac_pairs_beat_pom``, ``n_pairs``, ``n_pairs_total``, ``seed``,
    and ``per_pair`` (DataFrame: ``idp_a``, ``idp_b``, ``corr_real``, ``corr_generated``, ``energy``,
    ``energy_pom``, ``mmd2``, ``mmd2_pom``).
    """
    idps = resolve_idps(real, generated, idps=idps, names=("real", "generated"))
    if len(idps) < 2:
        raise InputError(f"dependence needs at least 2 IDPs, got {idps}")
    rng = np.random.default_rng(seed)
    if product is None:
        product = product_of_marginals(generated, idps, within=within, seed=seed)
    r = idp_values(real, idps)
    mean, sd = np.nanmean(r, axis=0), np.nanstd(r, axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    r = _complete_rows((r - mean) / sd, max_rows, rng)
    g = _complete_rows((idp_values(generated, idps) - mean) / sd, max_rows, rng)
    p = _complete_rows((idp_values(product, idps) - mean) / sd, max_rows, rng)
    if min(len(r), len(g), len(p)) < 3:
        raise InputError("dependence needs at least 3 complete rows in the real, generated and "
                         "product-of-marginals samples")
    pairs = select_pairs(len(idps), max_pairs, seed)
    energy, energy_pom, mmd2, mmd2_pom = (np.empty(len(pairs)) for _ in range(4))
    for start in range(0, len(pairs), _PAIR_CHUNK):
        chunk = pairs[start:start + _PAIR_CHUNK]
        rc = np.stack([r[:, chunk[:, 0]], r[:, chunk[:, 1]]], axis=-1).transpose(1, 0, 2)
        gc = np.stack([g[:, chunk[:, 0]], g[:, chunk[:, 1]]], axis=-1).transpose(1, 0, 2)
        pc = np.stack([p[:, chunk[:, 0]], p[:, chunk[:, 1]]], axis=-1).transpose(1, 0, 2)
        sl = slice(start, start + len(chunk))
        ref = _PairSample(rc)
        energy[sl], mmd2[sl] = _energy_and_mmd(ref, gc, rng)
        energy_pom[sl], mmd2_pom[sl] = _energy_and_mmd(ref, pc, rng)
    corr_r = np.corrcoef(r, rowvar=False)
    corr_g = np.corrcoef(g, rowvar=False)
    per_pair = pd.DataFrame({
        "idp_a": [idps[i] for i in pairs[:, 0]],
        "idp_b": [idps[j] for j in pairs[:, 1]],
        "corr_real": corr_r[pairs[:, 0], pairs[:, 1]],
        "corr_generated": corr_g[pairs[:, 0], pairs[:, 1]],
        "energy": energy, "energy_pom": energy_pom, "mmd2": mmd2, "mmd2_pom": mmd2_pom,
    })
    n_total = len(idps) * (len(idps) - 1) // 2
    return {
        "energy": float(energy.mean()),
        "energy_pom": float(energy_pom.mean()),
        "energy_ratio": float(energy.mean() / energy_pom.mean()) if energy_pom.mean() > 0 else float("nan"),
        "mmd2": float(mmd2.mean()),
        "mmd2_pom": float(mmd2_pom.mean()),
        "mmd2_ratio": float(mmd2.mean() / mmd2_pom.mean()) if mmd2_pom.mean() > 0 else float("nan"),
        "frac_pairs_beat_pom": float(np.mean(energy < energy_pom)),
        "n_pairs": len(pairs),
        "n_pairs_total": n_total,
        "seed": seed,
        "per_pair": per_pair,
    }


def correlation_matrix_error(real: pd.DataFrame, generated: pd.DataFrame,
                             idps: Sequence[str] | None = None) -> dict:
    """Frobenius norm of the difference between real and generated IDP correlation matrices.

    Correlations are Pearson correlations of the standardised IDPs (pairwise-complete rows).
    ``rms`` = Frobenius / sqrt(D (D - 1)) is the root-mean-square error over off-diagonal entries, which
    is comparable across numbers of IDPs; ``frobenius`` is the headline of the paper; ``noise_floor`` is
    the Frobenius error expected from sampling noise alone at these sample sizes (a perfect model gets
    about this much). Also returns ``max_abs`` and both matrices (``real``, ``generated``).
    """
    idps = resolve_idps(real, generated, idps=idps, names=("real", "generated"))
    if len(idps) < 2:
        raise InputError(f"a correlation matrix needs at least 2 IDPs, got {idps}")
    corr_r = real[list(idps)].astype(float).corr()
    corr_g = generated[list(idps)].astype(float).corr()
    diff = (corr_r - corr_g).to_numpy()
    diff = np.nan_to_num(diff, nan=0.0)
    frob = float(np.sqrt(np.sum(diff**2)))
    d = len(idps)
    # Sampling noise alone gives Var(r_ij) ~ (1 - rho^2)^2 / n per sample, so a perfect model still has
    # this much error at these sample sizes.
    n_real = int(real[list(idps)].notna().all(axis=1).sum())
    n_gen = int(generated[list(idps)].notna().all(axis=1).sum())
    rho = np.nan_to_num(corr_r.to_numpy(), nan=0.0)
    off = ~np.eye(d, dtype=bool)
    inv_n = (1 / max(n_real, 1)) + (1 / max(n_gen, 1))
    floor = float(np.sqrt(np.sum((1 - rho[off] ** 2) ** 2) * inv_n))
    return {
        "frobenius": frob,
        "rms": float(frob / np.sqrt(d * (d - 1))),
        "noise_floor": floor,
        "max_abs": float(np.max(np.abs(diff))),
        "real": corr_r,
        "generated": corr_g,
    }


def pair_shape_descriptors(values: np.ndarray, pairs: np.ndarray, n_grid: int = 10,
                           limit: float = 3.0) -> np.ndarray:
    """Density shape of each IDP pair: its normalised 2-D histogram on a fixed grid over standardised values.

    Values beyond +-``limit`` fall in the outer cells, so tails count. Returns [P, n_grid * n_grid].
    """
    edges = np.linspace(-limit, limit, n_grid + 1)
    clipped = np.clip(values, -limit, limit)
    cell = np.clip(np.searchsorted(edges, clipped, side="right") - 1, 0, n_grid - 1)
    flat = cell[:, pairs[:, 0]] * n_grid + cell[:, pairs[:, 1]]              # [N, P]
    out = np.zeros((len(pairs), n_grid * n_grid))
    for p in range(len(pairs)):
        out[p] = np.bincount(flat[:, p], minlength=n_grid * n_grid)
    return out / out.sum(axis=1, keepdims=True)


def pair_of_pair_matrix(descriptors: np.ndarray) -> np.ndarray:
    """Hellinger distance between every two pair-density shapes: [P, D2] -> [P, P]."""
    root = np.sqrt(descriptors)
    gram = np.clip(root @ root.T, 0.0, 1.0)
    return np.sqrt(np.clip(1.0 - gram, 0.0, None))


def mantel_test(a: np.ndarray, b: np.ndarray, n_permutations: int = 999,
                seed: int = 0) -> tuple[float, float]:
    """Mantel r (Pearson correlation of upper triangles) of two square matrices and its permutation p.

    Rows and columns of ``a`` are permuted together; p = (1 + #{r_perm >= r}) / (B + 1) (one-sided:
    the generated structure should agree with the real one).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise InputError(f"Mantel test needs two square matrices of the same shape, got {a.shape} "
                         f"and {b.shape}")
    n = a.shape[0]
    if n < 3:
        return float("nan"), float("nan")
    iu = np.triu_indices(n, 1)
    bv = b[iu] - b[iu].mean()
    bn = np.sqrt(np.sum(bv**2))

    def corr(av):
        av = av - av.mean(axis=-1, keepdims=True)
        denom = np.sqrt(np.sum(av**2, axis=-1)) * bn
        return np.where(denom > 0, (av @ bv) / np.where(denom > 0, denom, 1.0), np.nan)

    observed = float(corr(a[iu]))
    rng = np.random.default_rng(seed)
    null = np.empty(n_permutations)
    for start in range(0, n_permutations, 64):
        perms = np.argsort(rng.random((min(64, n_permutations - start), n)), axis=1)
        null[start:start + len(perms)] = corr(a[perms[:, iu[0]], perms[:, iu[1]]])
    p = (1 + np.sum(null >= observed - 1e-12)) / (n_permutations + 1)
    return observed, float(p)


def pair_of_pair_comparison(real: pd.DataFrame, generated: pd.DataFrame, idps: Sequence[str] | None = None,
                            max_idps: int = 20, n_grid: int = 10, n_permutations: int = 999,
                            seed: int = 0) -> dict:
    """Pair-of-pair density-shape matrices of real and generated data and their Mantel r (D <= ``max_idps``).

    Each IDP pair's standardised 2-D density (histogram on a 10 x 10 grid over +-3 SD, real data's
    mean/SD) is compared with every other pair's by Hellinger distance, giving one [P, P] matrix for
    the real and one for the generated data. Mantel r near 1 means the generated data reproduce which
    pairs look alike and which differ. Returns ``mantel_r``, ``mantel_p``, ``n_pairs``, ``real`` and
    ``generated`` matrices; with more than ``max_idps`` IDPs the comparison is skipped (``mantel_r`` NaN,
    ``skipped`` says why).
    """
    idps = resolve_idps(real, generated, idps=idps, names=("real", "generated"))
    if len(idps) > max_idps:
        return {"mantel_r": float("nan"), "mantel_p": float("nan"), "n_pairs": 0,
                "skipped": f"{len(idps)} IDPs > {max_idps}: the pair-of-pair matrix is computed "
                           f"for D <= {max_idps}"}
    if len(idps) < 3:
        return {"mantel_r": float("nan"), "mantel_p": float("nan"), "n_pairs": 0,
                "skipped": "the pair-of-pair matrix needs at least 3 IDPs"}
    r = idp_values(real, idps)
    mean, sd = np.nanmean(r, axis=0), np.nanstd(r, axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    r = (r[~np.isnan(r).any(axis=1)] - mean) / sd
    g = idp_values(generated, idps)
    g = (g[~np.isnan(g).any(axis=1)] - mean) / sd
    pairs = select_pairs(len(idps))
    real_matrix = pair_of_pair_matrix(pair_shape_descriptors(r, pairs, n_grid))
    gen_matrix = pair_of_pair_matrix(pair_shape_descriptors(g, pairs, n_grid))
    r_mantel, p_mantel = mantel_test(gen_matrix, real_matrix, n_permutations, seed)
    labels = [f"{idps[i]} x {idps[j]}" for i, j in pairs]
    return {
        "mantel_r": r_mantel,
        "mantel_p": p_mantel,
        "n_pairs": len(pairs),
        "real": pd.DataFrame(real_matrix, index=labels, columns=labels),
        "generated": pd.DataFrame(gen_matrix, index=labels, columns=labels),
    }
