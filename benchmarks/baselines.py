"""Per-IDP baselines for the peer benchmark: a Gaussian model with spline mean and variance in age.

``GaussianSplineBaseline`` is the classical normative model reduced to its core: for every IDP
independently, y ~ Normal(mu(x), sigma(x)^2) with mu and log sigma^2 each a cubic B-spline in age plus
sex and site effects, fitted by ridge-penalised feasible generalised least squares. It exposes the
small interface the benchmark uses (``fit``, ``predict_centiles``, ``predict_quantiles``, ``sample``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import special, stats
from sklearn.preprocessing import SplineTransformer

#: E[log chi^2_1]: log of a squared standard-normal residual is biased by this much.
_LOG_CHI2_1_MEAN = float(special.digamma(0.5) + np.log(2.0))


class GaussianSplineBaseline:
    """Independent Gaussian normative model per IDP with spline mean and spline log-variance in age.

    Parameters
    ----------
    covariates : the covariate columns; ``age`` is the continuous one, the others are categorical
        (each level gets a ridge-penalised offset in mean and log-variance).
    n_knots, degree : B-spline basis in age (knots uniform over the training age range; linear
        extrapolation beyond it).
    alpha : ridge penalty on all coefficients except the intercept (standardised outcome scale).
    n_iter : feasible GLS iterations (mean -> variance -> weighted mean ...).
    seed : seed of :meth:`sample`.
    """

    def __init__(self, covariates: Sequence[str] = ("age", "sex", "site"), n_knots: int = 6, degree: int = 3,
                 alpha: float = 1.0, n_iter: int = 3, seed: int = 0):
        self.covariates = covariates
        self.n_knots = n_knots
        self.degree = degree
        self.alpha = alpha
        self.n_iter = n_iter
        self.seed = seed

    # ------------------------------------------------------------------ design
    def _design(self, table: pd.DataFrame) -> np.ndarray:
        age = table[["age"]].to_numpy(dtype=np.float64)
        blocks = [np.ones((len(table), 1)), self.spline_.transform(age)[:, 1:]]
        for name, levels in self.levels_.items():
            values = table[name].astype(str).to_numpy()
            unknown = sorted(set(values) - set(levels))
            if unknown:
                raise ValueError(f"covariate {name!r} has levels never seen in training: {unknown[:5]}")
            blocks.append((values[:, None] == np.asarray(levels)[None, 1:]).astype(np.float64))
        return np.concatenate(blocks, axis=1)

    def _ridge(self, X: np.ndarray, Y: np.ndarray, W: np.ndarray | None) -> np.ndarray:
        penalty = self.alpha * np.eye(X.shape[1])
        penalty[0, 0] = 0.0
        if W is None:
            return np.linalg.solve(X.T @ X + penalty, X.T @ Y)
        coef = np.empty((X.shape[1], Y.shape[1]))
        for j in range(Y.shape[1]):
            Xw = X * W[:, j:j + 1]
            coef[:, j] = np.linalg.solve(Xw.T @ X + penalty, Xw.T @ Y[:, j])
        return coef

    # ------------------------------------------------------------------ fit / predict
    def fit(self, table: pd.DataFrame, idps: Sequence[str] | None = None) -> GaussianSplineBaseline:
        if "age" not in self.covariates:
            raise ValueError("GaussianSplineBaseline needs 'age' among its covariates")
        if idps is None:
            skip = set(self.covariates) | {"participant_id", "session_id"}
            idps = [c for c in table.columns if c not in skip and pd.api.types.is_numeric_dtype(table[c])]
        self.idps_ = list(idps)
        data = table.dropna(subset=[*self.covariates, *self.idps_])
        self.spline_ = SplineTransformer(n_knots=self.n_knots, degree=self.degree, extrapolation="linear")
        self.spline_.fit(data[["age"]].to_numpy(dtype=np.float64))
        self.levels_ = {c: sorted(data[c].astype(str).unique()) for c in self.covariates if c != "age"}
        X = self._design(data)
        Y = data[self.idps_].to_numpy(dtype=np.float64)
        self.y_mean_, self.y_sd_ = Y.mean(axis=0), Y.std(axis=0)
        self.y_sd_[self.y_sd_ == 0] = 1.0
        Y = (Y - self.y_mean_) / self.y_sd_
        weights = None
        for _ in range(max(1, self.n_iter)):
            self.mean_coef_ = self._ridge(X, Y, weights)
            resid2 = (Y - X @ self.mean_coef_) ** 2
            self.logvar_coef_ = self._ridge(X, np.log(resid2 + 1e-12) - _LOG_CHI2_1_MEAN, None)
            weights = np.exp(-(X @ self.logvar_coef_))
        self.n_train_ = len(data)
        return self

    def _loc_scale(self, covariates: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        X = self._design(covariates)
        mu = X @ self.mean_coef_ * self.y_sd_ + self.y_mean_
        sd = np.exp(0.5 * (X @ self.logvar_coef_)) * self.y_sd_
        return mu, sd

    def predict_centiles(self, table: pd.DataFrame) -> pd.DataFrame:
        mu, sd = self._loc_scale(table)
        u = stats.norm.cdf((table[self.idps_].to_numpy(dtype=np.float64) - mu) / sd)
        # The estimator contract keeps centiles strictly inside (0, 1).
        u = np.clip(u, 1e-12, 1 - 1e-12)
        return pd.DataFrame(u, index=table.index, columns=self.idps_)

    def predict_quantiles(self, covariates: pd.DataFrame, q: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)
                          ) -> pd.DataFrame:
        q = np.atleast_1d(np.asarray(q, dtype=np.float64))
        mu, sd = self._loc_scale(covariates)
        values = mu[:, :, None] + sd[:, :, None] * stats.norm.ppf(q)[None, None, :]     # [R, D, Q]
        columns = pd.MultiIndex.from_product([self.idps_, q.tolist()], names=["idp", "q"])
        return pd.DataFrame(values.reshape(len(covariates), -1), index=covariates.index, columns=columns)

    def sample(self, covariates: pd.DataFrame, n_samples: int = 1000) -> np.ndarray:
        """Independent draws per IDP ``[rows, n_samples, D]`` (no dependence between IDPs, by design)."""
        mu, sd = self._loc_scale(covariates)
        shape = (len(covariates), int(n_samples), len(self.idps_))
        z = np.random.default_rng(self.seed).standard_normal(shape)
        return mu[:, None, :] + sd[:, None, :] * z
