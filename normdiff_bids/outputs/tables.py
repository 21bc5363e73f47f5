"""Deviation tables: tidy <-> wide conversion, and TSV files with JSON sidecars describing every column.

Tidy (``NormativeDiffusion.score``): one row per subject[/session] and IDP. Wide (group tables): one row
per subject[/session]: ids, covariates, ``joint_stat``, ``joint_centile``, ``joint_z``, ``extrapolated``,
then per IDP in model order ``<idp>_value``, ``<idp>_centile``, ``<idp>_z``, ``<idp>_tail``.
Per-subject files hold that subject's tidy rows; group tables are BIDS phenotype files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from normdiff_bids import bidsio
from normdiff_bids.conventions import ROW_ID_COLUMNS
from normdiff_bids.outputs import names
from normdiff_bids.outputs.dataset import output_lock
from normdiff_bids.outputs.regions import describe_idp

#: Identifier columns, in the order they lead every table (``row`` when the input had no ids).
ID_COLUMNS: tuple[str, ...] = ROW_ID_COLUMNS
#: Per-subject score columns of the wide table, in order.
SUBJECT_SCORE_COLUMNS: tuple[str, ...] = ("joint_stat", "joint_centile", "joint_z", "extrapolated",
                                          "unknown_site", "joint_n_idps", "cond_given_missing")
#: Per-IDP score fields of the wide table, in order (``<idp>_<field>``); the conditional ones exist only
#: for the IDPs that were not given.
IDP_FIELDS: tuple[str, ...] = ("value", "centile", "z", "tail", "cond_centile", "cond_z")
_CONDITIONAL_FIELDS = ("cond_centile", "cond_z")
#: Columns of the tidy table, in order (ids first).
TIDY_COLUMNS: tuple[str, ...] = ("idp", "value", "centile", "z", "tail", "cond_centile", "cond_z",
                                 "extrapolated", "unknown_site", "joint_stat", "joint_centile", "joint_z",
                                 "joint_n_idps", "cond_given_missing")
_BOOLEAN_COLUMNS = ("extrapolated", "unknown_site", "cond_given_missing")
#: Columns read as text whatever they look like (a site "01" must stay "01").
TEXT_COLUMNS: tuple[str, ...] = ("participant_id", "session_id", "sex", "site", "idp", "measure", "units")

Z_UNITS = "standard deviation"
_TAIL_LEVELS = {
    "-1": "below every model sample: centile and z come from the tail rule (Gaussian tail fitted to the "
          "lowest samples)",
    "0": "within the range of the model samples",
    "1": "above every model sample: centile and z come from the tail rule (Gaussian tail fitted to the "
         "highest samples)",
}
_BOOL_LEVELS = {
    "true": "the subject's covariates lie outside the range the model was trained on (extrapolation): "
            "interpret its scores with care",
    "false": "the subject's covariates lie within the training range",
}


# -------------------------------------------------------------------------------------------------------
# tidy <-> wide
# -------------------------------------------------------------------------------------------------------

def _id_columns(table: pd.DataFrame) -> list[str]:
    ids = [c for c in ID_COLUMNS if c in table.columns]
    if not ids:
        raise ValueError(
            f"the score table has none of the id columns {ID_COLUMNS}; got {list(table.columns)}")
    return ids


def scores_to_wide(tidy: pd.DataFrame, covariates: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per subject[/session] from the tidy score table, with its covariates.

    ``covariates`` (ids + covariate columns; IDP columns in it are ignored) is joined on the ids the two
    tables share. Rows and IDPs keep the order in which they first appear in ``tidy`` (model order).
    """
    missing = [c for c in ("idp", "centile", "z") if c not in tidy.columns]
    if missing:
        raise ValueError(f"the tidy score table lacks the columns {missing}; it has {list(tidy.columns)}")
    ids = _id_columns(tidy)
    idps = list(dict.fromkeys(tidy["idp"]))
    if tidy.duplicated([*ids, "idp"]).any():
        dup = tidy.loc[tidy.duplicated([*ids, "idp"], keep=False), [*ids, "idp"]].head(3)
        raise ValueError(
            f"the tidy score table has repeated (id, idp) rows, e.g.\n{dup.to_string(index=False)}")
    keys = tidy[ids].drop_duplicates().reset_index(drop=True)
    wide = keys.copy()

    per_subject = [c for c in SUBJECT_SCORE_COLUMNS if c in tidy.columns]
    if per_subject:
        first = tidy.drop_duplicates(ids)[[*ids, *per_subject]]
        wide = wide.merge(first, on=ids, how="left", validate="one_to_one")

    blocks = {}
    for field in IDP_FIELDS:
        if field not in tidy.columns:
            continue
        pivot = tidy.pivot(index=ids, columns="idp", values=field)
        pivot = pivot.reindex(columns=idps)
        if field in _CONDITIONAL_FIELDS:  # the given IDPs have none
            pivot = pivot.loc[:, pivot.notna().any(axis=0)]
        pivot.columns = [f"{idp}_{field}" for idp in pivot.columns]
        blocks[field] = pivot.reset_index()
    ordered = [f"{idp}_{field}" for idp in idps for field in IDP_FIELDS
               if field in blocks and f"{idp}_{field}" in blocks[field].columns]
    per_idp = keys.copy()
    for block in blocks.values():
        per_idp = per_idp.merge(block, on=ids, how="left", validate="one_to_one")
    wide = wide.merge(per_idp[[*ids, *ordered]], on=ids, how="left", validate="one_to_one")
    for idp in idps:
        col = f"{idp}_tail"
        if col in wide.columns:
            wide[col] = wide[col].astype("Int8")
    for col in _BOOLEAN_COLUMNS:
        if col in wide.columns:
            wide[col] = wide[col].astype("boolean")
    if "joint_n_idps" in wide.columns:
        wide["joint_n_idps"] = wide["joint_n_idps"].astype("Int16")

    if covariates is not None:
        cov_ids = [c for c in ids if c in covariates.columns]
        if not cov_ids:
            raise ValueError(f"the covariate table shares no id column with the scores ({ids})")
        skip = set(idps) | set(wide.columns)
        cov_cols = [c for c in covariates.columns if c not in skip]
        cov = covariates[[*cov_ids, *cov_cols]]
        if cov.duplicated(cov_ids).any():
            raise ValueError(f"the covariate table has repeated {cov_ids} rows; give one row per subject"
                             + (" and session" if "session_id" in cov_ids else ""))
        wide = wide.merge(cov, on=cov_ids, how="left", validate="one_to_one")
        front = [*ids, *cov_cols]
        wide = wide[[*front, *[c for c in wide.columns if c not in front]]]
    return wide


def idps_of_wide(wide: pd.DataFrame) -> list[str]:
    """IDP names of a wide table, in column order (each IDP has ``<idp>_centile`` and ``<idp>_z``)."""
    idps = []
    for col in wide.columns:
        if col.endswith("_centile") and col != "joint_centile" and not col.endswith("_cond_centile"):
            idp = col[: -len("_centile")]
            if f"{idp}_z" in wide.columns:
                idps.append(idp)
    return idps


def scores_to_long(wide: pd.DataFrame) -> pd.DataFrame:
    """The tidy table back from a wide one: rows subject-major, IDPs in column order; covariates dropped."""
    ids = _id_columns(wide)
    idps = idps_of_wide(wide)
    if not idps:
        raise ValueError("the wide table has no '<idp>_centile' / '<idp>_z' column pairs")
    n, d = len(wide), len(idps)
    long = pd.DataFrame({c: np.repeat(wide[c].to_numpy(), d) for c in ids})
    long["idp"] = pd.array(np.tile(np.array(idps, dtype=object), n), dtype="str")
    for field in IDP_FIELDS:
        cols = [f"{idp}_{field}" for idp in idps]
        if all(c in wide.columns for c in cols):
            flat = wide[cols].to_numpy(dtype=object if field == "tail" else "float64").reshape(-1)
            long[field] = pd.array(flat, dtype="Int8") if field == "tail" else flat
        elif field in _CONDITIONAL_FIELDS and any(c in wide.columns for c in cols):
            long[field] = wide.reindex(columns=cols).to_numpy(dtype="float64").reshape(-1)
    for col in SUBJECT_SCORE_COLUMNS:
        if col in wide.columns:
            long[col] = np.repeat(wide[col].to_numpy(), d)
    for col in _BOOLEAN_COLUMNS:
        if col in long.columns:
            long[col] = long[col].astype("boolean")
    return long[[*ids, *[c for c in TIDY_COLUMNS if c in long.columns]]]


# -------------------------------------------------------------------------------------------------------
# sidecars
# -------------------------------------------------------------------------------------------------------

def _levels(series: pd.Series, describe) -> dict[str, str]:
    values = sorted({str(v) for v in series.dropna()})
    return {v: describe(v) for v in values}


def column_descriptions(table: pd.DataFrame, idps: Sequence[str] | None = None) -> dict[str, dict]:
    """A BIDS column description (LongName, Description, Units or Levels) for every column of ``table``.

    Knows the id, covariate and score columns of the tidy, wide and per-subject tables; any other column
    is described as a covariate taken from participants.tsv / sessions.tsv.
    """
    idps = list(idps) if idps is not None else idps_of_wide(table)
    fields = {f"{idp}_{field}": (idp, field) for idp in idps for field in IDP_FIELDS}
    out: dict[str, dict] = {}
    given = given_idps(table, idps)
    for col in table.columns:
        if col in fields:
            out[col] = _idp_field(*fields[col])
        elif col in _KNOWN:
            out[col] = dict(_KNOWN[col])
        else:
            out[col] = _covariate(col, table[col])
        if col.endswith(_CONDITIONAL_FIELDS) and given:
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


def given_idps(table: pd.DataFrame, idps: Sequence[str] | None = None) -> list[str]:
    """The IDPs a table's conditional scores were given (none when it has no conditional scores): in a
    wide table those without ``<idp>_cond_centile``, in a tidy one those whose ``cond_centile`` is empty."""
    if "idp" in table.columns:
        if "cond_centile" not in table.columns:
            return []
        has = table.groupby("idp", sort=False)["cond_centile"].apply(lambda c: c.notna().any())
        return [idp for idp, any_value in has.items() if not any_value]
    idps = list(idps) if idps is not None else idps_of_wide(table)
    if not any(f"{idp}_cond_centile" in table.columns for idp in idps):
        return []
    return [idp for idp in idps if f"{idp}_cond_centile" not in table.columns]


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


def _covariate(col: str, series: pd.Series) -> dict:
    if col == "sex":
        text = {"F": "female", "M": "male", "0": "female (coded 0)", "1": "male (coded 1)"}
        return {"LongName": "Sex", "Description": "Sex as given in participants.tsv (model covariate)",
                "Levels": _levels(series, lambda v: text.get(v, v))}
    if col == "site":
        return {"LongName": "Acquisition site", "Description": "Site as given in participants.tsv (model "
                "covariate)", "Levels": _levels(series, lambda v: f"site {v}")}
    out = {"LongName": col, "Description": f"Covariate '{col}' as given in participants.tsv or sessions.tsv"}
    if not pd.api.types.is_numeric_dtype(series) and series.nunique() <= 50:
        out["Levels"] = _levels(series, lambda v: v)
    return out


# -------------------------------------------------------------------------------------------------------
# writing and reading
# -------------------------------------------------------------------------------------------------------

def write_tsv(table: pd.DataFrame, path: str | os.PathLike, sidecar: Mapping) -> tuple[Path, Path]:
    """Write ``table`` (tab-separated, ``n/a`` for missing, booleans as true/false) and its JSON sidecar."""
    path = Path(path)
    undocumented = [c for c in table.columns if c not in sidecar]
    if undocumented:
        raise ValueError(f"the sidecar of {path.name} does not describe the columns {undocumented}")
    bidsio.write_tsv(table, path, float_format="%.10g")
    return path, bidsio.write_json(path.with_suffix(".json"), dict(sidecar), ensure_ascii=False)


def read_scores_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a tidy, wide or per-subject table written here, with labels as text and types restored."""
    header = pd.read_csv(path, sep="\t", nrows=0).columns
    dtype = {c: "str" for c in header if c in TEXT_COLUMNS}
    table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False, dtype=dtype)
    for col in table.columns:
        if col == "tail" or col.endswith("_tail"):
            table[col] = table[col].astype("Int8")
        elif col in _BOOLEAN_COLUMNS:
            table[col] = table[col].map({"true": True, "false": False, True: True, False: False}
                                        ).astype("boolean")
        elif col == "joint_n_idps":
            table[col] = table[col].astype("Int16")
    return table


def subject_rows(scores: pd.DataFrame) -> list[tuple[dict[str, str], pd.DataFrame]]:
    """Split a tidy or wide table into (entities, that subject's tidy rows) pairs, in table order."""
    long = scores if "idp" in scores.columns else scores_to_long(scores)
    if "participant_id" not in long.columns:
        raise ValueError("per-subject files need a participant_id column")
    ids = [c for c in ("participant_id", "session_id") if c in long.columns]
    out = []
    for key, rows in long.groupby(ids, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        entities = names.subject_entities(*key)
        out.append((entities, rows.reset_index(drop=True)))
    return out


def subject_table(rows: pd.DataFrame) -> pd.DataFrame:
    """A subject's tidy rows with the measure and units of each IDP (what the per-subject file holds)."""
    table = rows.copy()
    info = [describe_idp(idp) for idp in table["idp"]]
    at = table.columns.get_loc("idp") + 1
    table.insert(at, "measure", [i.measure for i in info])
    table.insert(at + 1, "units", [i.units for i in info])
    return table


def write_subject_scores(output_dir: str | os.PathLike, scores: pd.DataFrame) -> list[Path]:
    """Write one deviation table (TSV + JSON) per subject[/session] of ``scores`` (tidy or wide).

    Files: ``sub-<label>[/ses-<label>]/anat/sub-<label>[_ses-<label>]_desc-deviations_scores.tsv``,
    one row per IDP plus the subject's joint deviation and extrapolation flag on each row.
    Returns the written paths (TSV, JSON, TSV, JSON, ...).
    """
    output_dir = Path(output_dir)
    written = []
    for entities, rows in subject_rows(scores):
        table = subject_table(rows)
        sidecar = {
            "Description": "Normative deviation scores of one subject's FreeSurfer IDPs: one row per IDP "
                           "(observed value, centile and z under the normative model at the subject's "
                           "covariates); the joint deviation of all IDPs is repeated on every row.",
            **column_descriptions(table, idps=list(table["idp"])),
        }
        written.extend(write_tsv(table, output_dir / names.scores_table_path(entities), sidecar))
    return written


def _phenotype_sidecar(table: pd.DataFrame, idps: Sequence[str]) -> dict:
    return {
        "Description": "normdiff-bids normative deviation scores, one row per participant (and session)",
        "MeasurementToolMetadata": {
            "Description": "Centiles and z-scores of FreeSurfer IDPs under a conditional denoising "
                           "diffusion normative model (normdiff-bids), and the joint deviation of all IDPs",
        },
        **column_descriptions(table, idps=idps),
    }


def write_group_table(output_dir: str | os.PathLike, wide: pd.DataFrame, *,
                      name: str = names.GROUP_TABLE_NAME, merge: bool = True) -> list[Path]:
    """Write the group tables (BIDS phenotype files, TSV + JSON) from a wide table; return the paths.

    BIDS phenotype files hold one row per participant, so rows with a session go to one file per session,
    ``phenotype/<name>_ses-<label>.tsv``, and rows without one to ``phenotype/<name>.tsv``.
    With ``merge=True`` the rows already in a file are kept unless ``wide`` has a row for the same
    participant, which replaces it: parallel participant-level jobs can each add their subjects. The
    read-merge-write happens under the output folder's lock.
    """
    if "participant_id" not in wide.columns:
        raise ValueError("a phenotype table needs a participant_id column")
    if wide["participant_id"].isna().any():
        raise ValueError("every row of a group table needs a participant_id")
    output_dir = Path(output_dir)
    written: list[Path] = []
    with output_lock(output_dir):
        for session, rows in _split_by_session(wide):
            table_name = name if session is None else f"{name}_ses-{names.clean_label(session, 'ses')}"
            path = output_dir / names.phenotype_path(table_name)
            table = rows
            if merge and path.exists():
                old = read_scores_table(path)
                keep = ~old["participant_id"].isin(rows["participant_id"])
                table = _restore_column_order(pd.concat([old.loc[keep], rows], ignore_index=True), old, rows)
            if table["participant_id"].duplicated().any():
                dup = sorted(set(table.loc[table["participant_id"].duplicated(), "participant_id"]))
                raise ValueError(f"participants repeated within one session of the group table: {dup}")
            table = _phenotype_columns(table)
            written.extend(write_tsv(table, path, _phenotype_sidecar(table, idps_of_wide(table))))
    return written


#: The phenotype table naming each scored row's role in the model (``phenotype/<name>[_ses-<label>].tsv``).
REFERENCE_TABLE_NAME = "normdiff_reference"
_SPLIT_LEVELS = {"train": "in the reference, used to fit the model (in-sample scores)",
                 "holdout": "in the reference, held out to evaluate the model (out-of-sample scores)",
                 "none": "not in the reference (out-of-sample scores)"}


def write_reference_table(output_dir: str | os.PathLike, reference: pd.DataFrame, *,
                          name: str = REFERENCE_TABLE_NAME) -> list[Path]:
    """Write each scored row's role in the model (``split``: train, holdout or none) as phenotype files.

    ``reference``: ids (``participant_id``, optionally ``session_id``) and ``split``. As the group tables,
    rows with a session go to one file per session (``phenotype/<name>_ses-<label>.tsv``), since BIDS
    phenotype files hold one row per participant. Returns the written paths (TSV, JSON, ...).
    """
    unknown = sorted(set(reference["split"].dropna()) - set(_SPLIT_LEVELS))
    if unknown:
        raise ValueError(f"split values {unknown} are not one of {sorted(_SPLIT_LEVELS)}")
    output_dir = Path(output_dir)
    written: list[Path] = []
    for session, rows in _split_by_session(reference):
        table_name = name if session is None else f"{name}_ses-{names.clean_label(session, 'ses')}"
        table = _phenotype_columns(rows.reset_index(drop=True))
        ids = [c for c in ID_COLUMNS if c in table.columns]
        sidecar = {
            "Description": "Role of each scored participant" + (" at this session" if session else "")
                           + " in the normative model: trained on it, held out to evaluate it, or outside "
                             "the reference",
            **column_descriptions(table[ids]),
            "split": {"LongName": "Normative reference split",
                      "Description": "How the row was used when the model was fitted",
                      "Levels": dict(_SPLIT_LEVELS)},
        }
        written.extend(write_tsv(table, output_dir / names.phenotype_path(table_name), sidecar))
    return written


def read_group_table(output_dir: str | os.PathLike, name: str = names.GROUP_TABLE_NAME) -> pd.DataFrame:
    """All rows of the group tables (every session file), as one wide table."""
    folder = Path(output_dir) / names.PHENOTYPE_DIR
    paths = sorted([*folder.glob(f"{name}.tsv"), *folder.glob(f"{name}_ses-*.tsv")])
    if not paths:
        raise FileNotFoundError(f"no group table {name}*.tsv in {folder}")
    return pd.concat([read_scores_table(p) for p in paths], ignore_index=True)


def _split_by_session(wide: pd.DataFrame):
    if "session_id" not in wide.columns:
        yield None, wide
        return
    missing = wide["session_id"].isna()
    if missing.any():
        yield None, wide.loc[missing]
    present = wide.loc[~missing]
    for session in dict.fromkeys(present["session_id"]):
        yield session, present.loc[present["session_id"] == session]


def _restore_column_order(table: pd.DataFrame, old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    order = list(dict.fromkeys([*new.columns, *old.columns]))
    return table[order]


def _phenotype_columns(table: pd.DataFrame) -> pd.DataFrame:
    # BIDS phenotype files start with participant_id (then session_id for longitudinal data).
    front = [c for c in ("participant_id", "session_id") if c in table.columns]
    rest = [c for c in table.columns if c not in front and c != "row"]
    return table[[*front, *rest]]


def wide_row(scores: pd.DataFrame, participant_id: str, session_id: str | None = None) -> pd.Series:
    """One subject's row of a wide table (``scores`` tidy or wide)."""
    wide = scores if "idp" not in scores.columns else scores_to_wide(scores)
    mask = wide["participant_id"].astype(str) == str(participant_id)
    if session_id is not None and "session_id" in wide.columns:
        mask &= wide["session_id"].astype(str) == str(session_id)
    found = wide.loc[mask]
    if len(found) != 1:
        raise ValueError(f"expected one row for {participant_id} {session_id or ''} in the scores, "
                         f"found {len(found)}")
    return found.iloc[0]


def z_by_idp(scores: pd.Series | pd.DataFrame | Mapping[str, float]) -> dict[str, float]:
    """``{idp: z}`` from a wide row, a subject's tidy rows, or a mapping ``{idp: z}``."""
    if isinstance(scores, pd.DataFrame):
        if "idp" not in scores.columns or "z" not in scores.columns:
            if len(scores) == 1:
                return z_by_idp(scores.iloc[0])
            raise ValueError("expected one subject's tidy rows (idp, z) or one wide row")
        ids = [c for c in ("participant_id", "session_id") if c in scores.columns]
        if ids and len(scores[ids].drop_duplicates()) > 1:
            raise ValueError("the score rows belong to more than one subject; pass one subject's rows")
        return {str(i): float(z) for i, z in zip(scores["idp"], scores["z"], strict=True)}
    if isinstance(scores, pd.Series):
        out = {}
        for key, value in scores.items():
            key = str(key)
            if key.endswith("_z") and key != "joint_z":
                out[key[:-2]] = float(value) if value is not None and not pd.isna(value) else float("nan")
        if not out:
            raise ValueError("the score row has no '<idp>_z' entries")
        return out
    return {str(k): float(v) for k, v in scores.items()}


def covariate_columns(wide: pd.DataFrame, idps: Iterable[str] | None = None) -> list[str]:
    """Covariate columns of a wide table (everything that is neither an id nor a score)."""
    idps = list(idps) if idps is not None else idps_of_wide(wide)
    score_cols = {f"{i}_{f}" for i in idps for f in IDP_FIELDS} | set(SUBJECT_SCORE_COLUMNS) | set(ID_COLUMNS)
    return [c for c in wide.columns if c not in score_cols]
