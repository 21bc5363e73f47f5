"""The prediction and scoring API of :class:`~normdiff_bids.model.estimator.NormativeDiffusion`:
draws, quantiles, centiles, z-scores and the tidy score table of a fitted model, and the draw machinery
(scoring grid, drawer, weights token) they share.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from normdiff_bids.conventions import ID_COLUMNS, preview
from normdiff_bids.errors import InputError
from normdiff_bids.model.sampling import (
    GRID_STEP_FRACTION,
    Drawer,
    Grid,
    plan_points,
    scored_points,
    small_blas,
)
from normdiff_bids.model.tables import idp_matrix
from normdiff_bids.scoring.centiles import centiles_to_z, empirical_centiles, sample_quantiles
from normdiff_bids.scoring.conditional import MIN_SPARE_DRAWS, conditional_centiles, joint_subset_scores
from normdiff_bids.scoring.conformal import CentileCalibration
from normdiff_bids.scoring.joint import joint_scores


class _PredictionMixin:
    """The prediction methods of :class:`~normdiff_bids.model.estimator.NormativeDiffusion`.

    They read the fitted state (``idps_``, ``covariate_schema_``, ``encoder_``, ``network_``,
    ``_diffusion``, ``stage_``, ``calibration_``, ``draw_table_``) and the estimator's
    ``_check_fitted``, ``_model_space``, ``_sampler`` and ``_steps``.
    """

    # ------------------------------------------------------------------ sampling machinery
    def _encode(self, table: pd.DataFrame):
        """Encoded covariates, rows that cannot be scored, rows outside the training range."""
        if not isinstance(table, pd.DataFrame):
            raise TypeError(f"expected a pandas DataFrame of covariates, got {type(table).__name__}")
        schema = self.covariate_schema_
        cont, cat = schema.encode(table, unknown=self.unknown_site)
        missing = schema.missing_rows(cont, cat)
        finite = np.where(np.isfinite(cont), cont, 0)
        extrapolated = (schema.out_of_range(finite) | schema.out_of_level_range(finite, cat)) & ~missing
        if missing.any():
            ids = [c for c in ID_COLUMNS if c in table.columns]
            named = table.index[missing]
            if ids:
                named = table.loc[missing, ids].apply(lambda r: "_".join(map(str, r.dropna())), axis=1)
            rows = table.loc[missing]
            columns = [c for c in self.covariates if c in rows.columns and rows[c].isna().any()]
            count = int(missing.sum())
            has, gets = ("row has", "gets") if count == 1 else ("rows have", "get")
            warnings.warn(f"{count} {has} a missing covariate ({', '.join(columns) or 'an unseen level'}) "
                          f"and {gets} no scores (NaN): "
                          f"{preview([str(v) for v in named])}", stacklevel=3)
        return cont, cat, missing, extrapolated

    def _use_grid(self) -> bool:
        return self.covariate_grid == "auto" and self.covariate_schema_.n_continuous == 1

    def _grid_step(self) -> float:
        if self.grid_step is not None:
            return float(self.grid_step)
        return float(self.covariate_schema_.continuous[0].sd * GRID_STEP_FRACTION)

    def _grid(self) -> Grid | None:
        """The scoring grid (``covariate_grid="auto"`` with one continuous covariate), else ``None``."""
        if not self._use_grid():
            return None
        cov = self.covariate_schema_.continuous[0]
        return Grid(mean=cov.mean, sd=cov.sd, step=self._grid_step())

    def _drawer(self, use_table: bool = True) -> Drawer:
        table = getattr(self, "draw_table_", None) if use_table and self.draw_table == "auto" else None
        return Drawer(self._network_modules, seed=int(self.seed),
                      sampler=self._sampler(), steps=self._steps(), n_features=self.n_features_in_,
                      weights_token=self._weights_token(), verbose=self.verbose,
                      standardise=self.stage_ is not None, table=table)

    def _scored_points(self, cont, cat, missing, with_joint: bool):
        """As :func:`~normdiff_bids.model.sampling.scored_points`, on the covariates the network sees."""
        return scored_points(self._drawer(), self._grid(), cont, self._model_space().network_cat(cat),
                             missing, int(self.n_samples), with_joint,
                             float(getattr(self, "joint_shrinkage_", 0.0)))

    def _calibrated(self) -> CentileCalibration | None:
        return self.calibration_ if self.calibration == "conformal" else None

    def curve_ages(self, low: float, high: float, n_points: int = 15) -> np.ndarray:
        """About ``n_points`` ages from ``low`` to ``high`` for centile curves over age.

        On the scoring grid they are snapped onto grid points, so every curve at the same other
        covariates reuses the same draws (and each point costs one draw, not an interpolated two).
        """
        ages = np.linspace(float(low), float(high), int(n_points))
        if not self._use_grid():
            return ages
        step = self._grid_step()
        return np.unique(np.round(ages / step)) * step

    def _network_modules(self) -> tuple:
        """``(encoder, network, diffusion)``; a loaded model builds them here, on first use."""
        return self.encoder_, self.network_, self._diffusion

    def _weights_token(self) -> str:
        """A digest of the fitted weights: the identity of their draws (the process-wide draw cache, the
        draw table's settings), taken over each module's weights in its own order; a loaded model takes
        it from the bundle's arrays in that order, without building its network."""
        token = getattr(self, "_weights_digest", None)
        if token is None:
            unbuilt = self.__dict__.get("_unbuilt")
            weights = unbuilt.weights if unbuilt is not None else self._weight_arrays()
            h = hashlib.blake2b(digest_size=16)
            for name, array in weights.items():
                h.update(name.split(".", 1)[1].encode())  # the module's own name, without the prefix
                h.update(np.ascontiguousarray(array).tobytes())
            token = self._weights_digest = h.hexdigest()
        return token

    def _weight_arrays(self) -> dict[str, np.ndarray]:
        """The encoder's and network's weights as numpy arrays under their bundle names, in the modules'
        order."""
        return {f"{prefix}.{name}": tensor.detach().cpu().contiguous().numpy()
                for prefix, module in (("encoder", self.encoder_), ("network", self.network_))
                for name, tensor in module.state_dict().items()}

    def _values(self, table) -> np.ndarray:
        missing = [c for c in self.idps_ if c not in table.columns]
        if missing:
            shown = missing if len(missing) <= 20 else missing[:20] + [f"... ({len(missing) - 20} more)"]
            raise InputError(f"the table lacks {len(missing)} of the model's {self.n_features_in_} IDP "
                             f"columns: {shown}; score a table with the IDPs the model was trained on")
        return idp_matrix(table, self.idps_, "scoring")

    # ------------------------------------------------------------------ public prediction API
    def sample(self, covariates: pd.DataFrame, n_samples: int | None = None) -> np.ndarray:
        """Draws from the model at each row's exact covariates: ``[rows, n_samples, D]``, original units.

        Rows with identical covariates get identical draws (one stream per covariate point); rows with
        a missing covariate get NaN.
        """
        self._check_fitted()
        n_samples = int(n_samples or self.n_samples)
        cont, cat, missing, _ = self._encode(covariates)
        rows = np.flatnonzero(~missing)
        out = np.full((len(covariates), n_samples, self.n_features_in_), np.nan)
        if len(rows):
            space = self._model_space()
            # the network's covariates only: rows of different sites share the draws of their point
            points_cont, points_cat, lo, _, _ = plan_points(cont, space.network_cat(cat), rows, grid=None)
            for first, samples in self._drawer().draw(points_cont, points_cat, n_samples, desc="sampling"):
                sel = (lo >= first) & (lo < first + len(samples))
                target = rows[sel]
                out[target] = space.from_model(samples[lo[sel] - first], cont[target], cat[target])
        return out

    def predict_quantiles(self, covariates: pd.DataFrame, q: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)
                          ) -> pd.DataFrame:
        """Model quantiles ``q`` of every IDP at each row's covariates, in original units.

        Columns: a ``MultiIndex`` (idp, q). The same draws (and grid) as scoring.
        """
        self._check_fitted()
        q = np.atleast_1d(np.asarray(q, dtype=np.float64))
        out = np.full((len(covariates), len(q), self.n_features_in_), np.nan)
        cont, cat, missing, _ = self._encode(covariates)
        space, layer = self._model_space(), self._calibrated()
        sites = space.site_codes(cat)
        levels = np.broadcast_to(q[:, None], (len(q), self.n_features_in_))
        # each site's model centiles, per IDP, whose calibrated centiles are q: [Q, D] (once per site)
        model_levels = {int(code): levels if layer is None
                        else layer.inverse(levels[None], np.array([code]))[0] for code in np.unique(sites)}
        with small_blas():
            for rows, srt, _ in self._scored_points(cont, cat, missing, with_joint=False):
                for code in np.unique(sites[rows]):
                    sub = sites[rows] == code
                    target = rows[sub]
                    model_q = _quantiles_per_idp(srt[sub], model_levels[int(code)])  # [r, Q, D]
                    out[target] = space.from_model(model_q, cont[target], cat[target])
        columns = pd.MultiIndex.from_product([self.idps_, q.tolist()], names=["idp", "q"])
        return pd.DataFrame(out.transpose(0, 2, 1).reshape(len(covariates), -1), index=covariates.index,
                            columns=columns)

    def _score_arrays(self, table: pd.DataFrame, with_joint: bool = True, given=None) -> dict:
        self._check_fitted()
        given_idx = self._given_indices(given)
        values = self._values(table)
        cont, cat, missing, extrapolated = self._encode(table)
        space = self._model_space()
        z_values = space.to_model(values, cont, cat)
        layer = self._calibrated()
        sites = space.site_codes(cat)
        conditional = None
        if given_idx is not None:
            targets = tuple(j for j in range(self.n_features_in_) if j not in given_idx)

            def calibrate(centiles, rows):
                return centiles if layer is None else layer.transform(centiles, sites[rows])

            conditional = (given_idx, targets, calibrate)
        out = self._score_model_space(z_values, cont, cat, missing, with_joint, conditional)
        if layer is not None:
            out["centiles"] = layer.transform(out["centiles"], sites)
            # the joint map was learnt over every IDP: rows scored on a subset keep their raw centile
            complete = out["joint_n_idps"] == self.n_features_in_
            out["joint_centile"] = np.where(complete, layer.transform_joint(out["joint_centile"]),
                                            out["joint_centile"])
        if given_idx is not None:
            lacking = ~np.isfinite(values[:, list(given_idx)]).all(axis=1) & ~missing
            if lacking.any():
                rows = list(table.index[lacking][:5])
                warnings.warn(f"{int(lacking.sum())} rows lack a value of a given IDP and get no "
                              f"conditional scores (cond_given_missing), e.g. rows {rows}", stacklevel=3)
            out.update(given=given_idx, targets=conditional[1], cond_given_missing=lacking)
        out.update(values=values, extrapolated=extrapolated, missing_covariates=missing,
                   unknown_site=self.covariate_schema_.marginal_rows(cat) & ~missing)
        return out

    def _given_indices(self, given) -> tuple[int, ...] | None:
        """The model's indices of the ``given`` IDPs (``None``: no conditioning), checked."""
        if given is None:
            return None
        names = [given] if isinstance(given, str) else list(given)
        if not names:
            return None
        unknown = [g for g in names if g not in self.idps_]
        if unknown:
            raise InputError(f"given IDPs {unknown} are not IDPs of this model; condition on some of its "
                             f"{self.n_features_in_} IDPs, e.g. {self.idps_[:3]}")
        idx = tuple(sorted({self.idps_.index(g) for g in names}))
        if len(idx) == self.n_features_in_:
            raise InputError(f"every one of the model's {self.n_features_in_} IDPs is given, so none is "
                             f"left to score conditionally; leave at least one IDP out of given")
        if len(idx) + 1 + MIN_SPARE_DRAWS > int(self.n_samples):
            need = len(idx) + 1 + MIN_SPARE_DRAWS
            raise InputError(f"conditioning on {len(idx)} IDPs needs more than {need} draws per point, the "
                             f"model has n_samples={self.n_samples}; raise n_samples or give fewer IDPs")
        return idx

    def _score_model_space(self, z_values, cont, cat, missing, with_joint: bool, conditional=None) -> dict:
        """Uncalibrated centiles, tail flags and joint scores of model-space values ``[R, D]``.

        A row with missing IDPs gets its joint deviation over the IDPs it has (``joint_n_idps``).
        ``conditional=(given, targets, calibrate)``: also the conditional centiles ``[R, T]`` of the
        target IDPs given the given ones, from the rows' calibrated normal scores
        (``calibrate(raw centiles, rows)``); see :mod:`~normdiff_bids.scoring.conditional`.
        """
        n, d = z_values.shape
        centiles = np.full((n, d), np.nan)
        tail = np.zeros((n, d), dtype=np.int8)
        joint = np.full((n, 3), np.nan)
        cond = None if conditional is None else np.full((n, len(conditional[1])), np.nan)
        with small_blas():
            for rows, srt, draws in self._scored_points(cont, cat, missing, with_joint or cond is not None):
                c, t = empirical_centiles(z_values[rows], srt)
                centiles[rows], tail[rows] = c, t
                if with_joint:
                    for row, z_row, point in zip(rows, centiles_to_z(c), draws):
                        if np.isfinite(z_row).all():
                            chol, ref = point.joint()
                            stat, centile = joint_scores(z_row[None], chol[None], ref[None])
                            joint[row] = stat[0], centile[0], d
                        else:
                            joint[row] = joint_subset_scores(z_row, point)
                if cond is not None:
                    given, targets, calibrate = conditional
                    u = centiles_to_z(calibrate(c, rows))
                    owner = np.array([id(p) for p in draws])
                    for key in np.unique(owner):
                        sel = owner == key
                        point = draws[int(np.flatnonzero(sel)[0])]
                        cond[rows[sel]] = conditional_centiles(u[sel], point, given, targets)
        return {"centiles": centiles, "tail": tail, "joint_stat": joint[:, 0], "joint_centile": joint[:, 1],
                "joint_n_idps": joint[:, 2], "cond_centiles": cond}

    def predict_centiles(self, table: pd.DataFrame, given: Sequence[str] | None = None) -> pd.DataFrame:
        """Centile of each IDP value at the row's covariates: ``[rows, D]`` strictly inside (0, 1).

        NaN where the value or a covariate is missing (a missing IDP leaves the others unchanged).
        ``given``: IDP names; then the centile of every other IDP conditional on the row's own values of
        the given ones (and the covariates), one column per IDP not given: "is this hippocampus small
        for this head size?" (:mod:`~normdiff_bids.scoring.conditional`). Rows lacking a given value
        get NaN.
        """
        arrays = self._score_arrays(table, with_joint=False, given=given)
        if arrays.get("given") is None:
            return pd.DataFrame(arrays["centiles"], index=table.index, columns=self.idps_)
        return pd.DataFrame(arrays["cond_centiles"], index=table.index,
                            columns=[self.idps_[j] for j in arrays["targets"]])

    def predict_zscores(self, table: pd.DataFrame, given: Sequence[str] | None = None) -> pd.DataFrame:
        """``Phi^-1`` of :meth:`predict_centiles` (conditional on ``given`` when it is given)."""
        centiles = self.predict_centiles(table, given=given)
        return pd.DataFrame(centiles_to_z(centiles.to_numpy()), index=table.index, columns=centiles.columns)

    def score(self, table: pd.DataFrame, given: Sequence[str] | None = None) -> pd.DataFrame:
        """Tidy scores: one row per (subject[/session], IDP).

        Columns: ``participant_id`` (or ``row``, the table's index, when there is no id column),
        ``session_id`` (when present), ``idp``, ``value``, ``centile``, ``z``, ``tail`` (-1/0/+1: value
        beyond the sampled range, scored by the tail rule), ``extrapolated`` (covariates outside the
        training range, overall or of the row's own site), ``unknown_site`` (scored under the model's
        marginal over sites: a site it never saw, or none, with ``unknown_site="marginal"``),
        ``joint_stat``, ``joint_centile``, ``joint_z`` and ``joint_n_idps`` (how many IDPs the joint
        deviation used: fewer than the model's when some are missing; it is then computed
        over those present, against the model's draws of the same IDPs). A missing value or covariate
        gives NaN centile and z. With ``given``: also ``cond_centile`` and ``cond_z`` (NaN on the given
        IDPs' rows) and ``cond_given_missing`` (the row lacks a given value, so it has no conditional
        scores).
        """
        a = self._score_arrays(table, with_joint=True, given=given)
        n, d = a["values"].shape
        columns = {}
        if "participant_id" in table.columns:
            columns["participant_id"] = np.repeat(table["participant_id"].to_numpy(dtype=object), d)
        else:
            columns["row"] = np.repeat(table.index.to_numpy(), d)
        if "session_id" in table.columns:
            columns["session_id"] = np.repeat(table["session_id"].to_numpy(dtype=object), d)
        n_idps = a["joint_n_idps"]
        columns.update({
            "idp": np.tile(np.asarray(self.idps_, dtype=object), n),
            "value": a["values"].reshape(-1),
            "centile": a["centiles"].reshape(-1),
            "z": centiles_to_z(a["centiles"]).reshape(-1),
            "tail": a["tail"].reshape(-1),
            "extrapolated": np.repeat(a["extrapolated"], d),
            "unknown_site": np.repeat(a["unknown_site"], d),
            "joint_stat": np.repeat(a["joint_stat"], d),
            "joint_centile": np.repeat(a["joint_centile"], d),
            "joint_z": np.repeat(centiles_to_z(a["joint_centile"]), d),
            "joint_n_idps": pd.array(np.repeat(np.where(np.isfinite(n_idps), n_idps, -1), d),
                                     dtype="Int16"),
        })
        columns["joint_n_idps"][columns["joint_n_idps"] < 0] = pd.NA
        if a.get("given") is not None:
            cond = np.full((n, d), np.nan)
            cond[:, list(a["targets"])] = a["cond_centiles"]
            columns.update(cond_centile=cond.reshape(-1), cond_z=centiles_to_z(cond).reshape(-1),
                           cond_given_missing=np.repeat(a["cond_given_missing"], d))
        return pd.DataFrame(columns)


def _quantiles_per_idp(samples: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """:func:`sample_quantiles` of ``samples [R, S, D]`` at levels of each IDP's own, ``levels [Q, D]``:
    ``[R, Q, D]`` (IDPs that share their levels are done together)."""
    out = np.empty((samples.shape[0], levels.shape[0], samples.shape[2]))
    columns, groups = np.unique(levels, axis=1, return_inverse=True)
    for g in range(columns.shape[1]):
        idx = np.flatnonzero(groups.reshape(-1) == g)
        out[:, :, idx] = sample_quantiles(samples[:, :, idx], columns[:, g])
    return out
