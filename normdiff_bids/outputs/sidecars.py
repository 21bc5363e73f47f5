"""What the JSON sidecars of the score tables say: a BIDS description (LongName, Description, Units or
Levels) of every column, and the description of each table (per-subject, group and reference).

The tables' shapes and columns are in ``score_tables``; writing them is ``score_files``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from normdiff_bids.outputs.regions import describe_idp
from normdiff_bids.outputs.score_tables import (
    CONDITIONAL_FIELDS,
    ID_COLUMNS,
    IDP_FIELDS,
    given_idps,
    idps_of_wide,
)

#: Units of every z column.
Z_UNITS = "standard deviation"
_TAIL_LEVELS = {
    "-1": "below every model sample: centile and z come from the tail rule (a skew-aware tail fitted to "
          "the lower half of the samples)",
    "0": "within the range of the model samples",
    "1": "above every model sample: centile and z come from the tail rule (a skew-aware tail fitted to "
         "the upper half of the samples)",
}
_BOOL_LEVELS = {
    "true": "the subject's covariates lie outside the range the model was trained on (extrapolation): "
            "interpret its scores with care",
    "false": "the subject's covariates lie within the training range",
}


def _levels(series: pd.Series, describe) -> dict[str, str]:
    values = sorted({str(v) for v in series.dropna()})
    return {v: describe(v) for v in values}


def column_descriptions(table: pd.DataFrame, idps: Sequence[str] | None = None,
                        covariates=None) -> dict[str, dict]:
    """A BIDS column description (LongName, Description, Units or Levels) for every column of ``table``.

    Knows the id, covariate and score columns of the tidy, wide and per-subject tables; any other column
    is described as a covariate taken from participants.tsv / sessions.tsv. ``covariates``: the
    covariate specification (:class:`~normdiff_bids.covariate_spec.CovariateSpecs` or its list form),
    which says each covariate's source column and kind (categorical ones list their levels); without
    it, only non-numeric columns are taken as categorical.
    """
    from normdiff_bids.covariate_spec import CovariateSpecs

    spec = CovariateSpecs.coerce(covariates) if covariates is not None else None
    idps = list(idps) if idps is not None else idps_of_wide(table)
    fields = {f"{idp}_{field}": (idp, field) for idp in idps for field in IDP_FIELDS}
    out: dict[str, dict] = {}
    given = given_idps(table, idps)
    for col in table.columns:
        if col in fields:
            out[col] = _idp_field(*fields[col])
        elif spec is not None and col in spec:
            out[col] = _covariate(col, table[col], spec[col])
        elif col in _KNOWN:
            out[col] = dict(_KNOWN[col])
        else:
            out[col] = _covariate(col, table[col])
        if col.endswith(CONDITIONAL_FIELDS) and given:
            out[col]["Description"] += f" (given: {', '.join(given)})"
        if col == "idp":
            out[col]["Levels"] = {idp: describe_idp(idp).description for idp in dict.fromkeys(table[col])}
        elif col == "measure":
            out[col]["Levels"] = _levels(table[col], lambda v: _MEASURE_TEXT.get(v, v))
        elif col == "units":
            out[col]["Levels"] = _levels(table[col], lambda v: _UNITS_TEXT.get(v, v))
    return out


_MEASURE_TEXT = {
    "volume": "volume (mm^3)", "thickness": "mean cortical thickness (mm)",
    "area": "white-surface area (mm^2)",
    "thicknessstd": "standard deviation of cortical thickness (mm)", "meancurv": "mean curvature (mm^-1)",
    "ratio": "ratio (dimensionless)", "count": "count", "other": "other measure",
}

_UNITS_TEXT = {"mm^3": "cubic millimetres", "mm^2": "square millimetres", "mm": "millimetres",
               "mm^-1": "per millimetre", "mm^-2": "per square millimetre", "n/a": "dimensionless or unknown"}

_KNOWN: dict[str, dict] = {
    "participant_id": {"LongName": "Participant identifier",
                       "Description": "BIDS participant label, with its 'sub-' prefix"},
    "session_id": {"LongName": "Session identifier",
                   "Description": "BIDS session label, with its 'ses-' prefix"},
    "row": {"LongName": "Row number", "Description": "Row of the scored table (it had no participant ids)"},
    "age": {"LongName": "Age", "Description": "Age at the session, as given in participants.tsv or "
            "sessions.tsv", "Units": "year"},
    "idp": {"LongName": "Imaging-derived phenotype",
            "Description": "FreeSurfer IDP name (asegstats2table / aparcstats2table style, "
                           "FreeSurfer 7 spelling)"},
    "measure": {"LongName": "Measure", "Description": "What the IDP measures"},
    "units": {"LongName": "Units of the value", "Description": "Units of the 'value' column on this row"},
    "value": {"LongName": "Observed value",
              "Description": "The subject's IDP value as measured by FreeSurfer (units in the 'units' column "
                             "and in the 'idp' levels)"},
    "centile": {"LongName": "Centile",
                "Description": "Position of the observed value in the model's conditional distribution at "
                               "the subject's covariates: the mid-rank fraction of model samples below it, "
                               "strictly between 0 and 1 (0.5 = median)",
                "Units": "proportion"},
    "z": {"LongName": "Deviation z-score",
          "Description": "Normal deviate of the centile, z = Phi^-1(centile); |z| > 1.96 is outside the "
                         "central 95% of the normative distribution, |z| > 2.58 outside the central 99%",
          "Units": Z_UNITS},
    "tail": {"LongName": "Tail flag", "Description": "Whether the value lies beyond the sampled range",
             "Levels": _TAIL_LEVELS},
    "extrapolated": {"LongName": "Covariates outside the training range",
                     "Description": "Whether the subject's covariates lie outside the model's training range",
                     "Levels": _BOOL_LEVELS},
    "joint_stat": {"LongName": "Joint deviation statistic",
                   "Description": "Multivariate deviation of the subject's whole IDP vector: Mahalanobis "
                                  "length of its vector of per-IDP normal scores, with the covariance of "
                                  "the model's samples at its covariates (larger = more atypical); its "
                                  "scale depends on the number of IDPs, so compare subjects through "
                                  "joint_centile and joint_z",
                   "Units": "arbitrary"},
    "joint_centile": {"LongName": "Joint deviation centile",
                      "Description": "Fraction of the model's own samples at the subject's covariates whose "
                                     "joint deviation statistic is below the subject's",
                      "Units": "proportion"},
    "unknown_site": {"LongName": "Scored under the marginal over sites",
                     "Description": "Whether the subject's site was unknown to the model (never seen in "
                                    "training, or missing) and it was scored under the model's mixture "
                                    "over the training sites (--unknown-site marginal): its centiles carry "
                                    "the spread between sites",
                     "Levels": {"true": "site unknown to the model: scored under the marginal over sites",
                                "false": "the model knows the subject's site"}},
    "joint_n_idps": {"LongName": "IDPs in the joint deviation",
                     "Description": "How many IDPs the joint deviation was computed over: all the model's "
                                    "unless some are missing for this subject, when it is computed over "
                                    "those present against the model's samples of the same IDPs",
                     "Units": "count"},
    "cond_centile": {"LongName": "Conditional centile",
                     "Description": "Centile of the observed value given the subject's own values of the "
                                    "given IDPs (and its covariates): the mid-rank of its residual from the "
                                    "model's regression on the given IDPs among the same residuals of the "
                                    "model's samples",
                     "Units": "proportion"},
    "cond_z": {"LongName": "Conditional deviation z-score",
               "Description": "Normal deviate of the conditional centile, Phi^-1(cond_centile)",
               "Units": Z_UNITS},
    "cond_given_missing": {"LongName": "Given IDP missing",
                           "Description": "Whether a given IDP is missing for the subject, so that it has "
                                          "no conditional scores",
                           "Levels": {"true": "a given IDP is missing: no conditional scores",
                                      "false": "every given IDP is present"}},
    "joint_z": {"LongName": "Joint deviation z-score",
                "Description": "Normal deviate of joint_centile: how atypical the subject's IDPs are "
                               "taken together (one-sided: large positive values are atypical, negative "
                               "values closer to typical than most)", "Units": Z_UNITS},
}


def _idp_field(idp: str, field: str) -> dict:
    info = describe_idp(idp)
    if field == "value":
        out = {"LongName": f"{idp} (observed)", "Description": f"Observed {info.description}"}
        if info.units != "n/a":
            out["Units"] = info.units
        return out
    base = dict(_KNOWN[field])
    base["LongName"] = f"{idp} {base['LongName'].lower()}"
    base["Description"] = f"{info.description}: {base['Description'][0].lower()}{base['Description'][1:]}"
    return base


def _covariate(col: str, series: pd.Series, spec=None) -> dict:
    """A covariate column: by its role (``spec``, else its name: age, sex, site), else as a column of
    participants.tsv (with its levels when it is categorical)."""
    role = spec.role if spec is not None else col if col in ("age", "sex", "site") else None
    source = "" if spec is None or spec.column == col else f" column {spec.column!r}"
    if role == "age":
        out = dict(_KNOWN["age"])
        if source:
            out["Description"] = f"Age at the session, as given in participants.tsv{source} or sessions.tsv"
        return out
    if role == "sex":
        text = {"F": "female", "M": "male", "0": "female (coded 0)", "1": "male (coded 1)"}
        return {"LongName": "Sex",
                "Description": f"Sex as given in participants.tsv{source} (model covariate)",
                "Levels": _levels(series, lambda v: text.get(v, v))}
    if role == "site":
        return {"LongName": "Acquisition site", "Description": f"Site as given in participants.tsv{source} "
                "(model covariate)", "Levels": _levels(series, lambda v: f"site {v}")}
    if spec is None:
        out = {"LongName": col,
               "Description": f"Covariate '{col}' as given in participants.tsv or sessions.tsv"}
        if not pd.api.types.is_numeric_dtype(series) and series.nunique() <= 50:
            out["Levels"] = _levels(series, lambda v: v)
        return out
    out = {"LongName": col, "Description": f"Covariate '{col}' of the model ({spec.kind}), as given in "
                                           f"participants.tsv column {spec.column!r}"}
    if spec.kind == "categorical":
        out["Levels"] = _levels(series, lambda v: f"{col} {v}")
    return out


# -- whole tables --------------------------------------------------------------------------------------

def subject_sidecar(table: pd.DataFrame) -> dict:
    """The sidecar of one subject's deviation table (its tidy rows with measure and units)."""
    return {
        "Description": "Normative deviation scores of one subject's FreeSurfer IDPs: one row per IDP "
                       "(observed value, centile and z under the normative model at the subject's "
                       "covariates); the joint deviation of all IDPs is repeated on every row.",
        **column_descriptions(table, idps=list(table["idp"])),
    }


def phenotype_sidecar(table: pd.DataFrame, idps: Sequence[str], covariates=None) -> dict:
    """The sidecar of a group table (a wide table as a BIDS phenotype file); ``covariates`` as in
    :func:`column_descriptions`."""
    return {
        "Description": "normdiff-bids normative deviation scores, one row per participant (and session)",
        "MeasurementToolMetadata": {
            "Description": "Centiles and z-scores of FreeSurfer IDPs under a conditional denoising "
                           "diffusion normative model (normdiff-bids), and the joint deviation of all IDPs",
        },
        **column_descriptions(table, idps=idps, covariates=covariates),
    }


#: What each value of a reference table's ``split`` column means.
SPLIT_LEVELS = {"train": "in the reference, used to fit the model (in-sample scores)",
                "holdout": "in the reference, held out to evaluate the model (out-of-sample scores)",
                "none": "not in the reference (out-of-sample scores)"}


def reference_sidecar(table: pd.DataFrame, session: str | None) -> dict:
    """The sidecar of a reference table (ids and ``split``), for one session or none."""
    ids = [c for c in ID_COLUMNS if c in table.columns]
    return {
        "Description": "Role of each scored participant" + (" at this session" if session else "")
                       + " in the normative model: trained on it, held out to evaluate it, or outside "
                         "the reference",
        **column_descriptions(table[ids]),
        "split": {"LongName": "Normative reference split",
                  "Description": "How the row was used when the model was fitted",
                  "Levels": dict(SPLIT_LEVELS)},
    }
