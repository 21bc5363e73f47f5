"""Score tables in memory: the tidy and wide shapes, their columns, and conversion between them.

Tidy (``NormativeDiffusion.score``): one row per subject[/session] and IDP. Wide (group tables): one row
per subject[/session]: ids, covariates, ``joint_stat``, ``joint_centile``, ``joint_z``, ``extrapolated``,
then per IDP in model order ``<idp>_value``, ``<idp>_centile``, ``<idp>_z``, ``<idp>_tail``.
Also here: a subject's rows or row picked out of either shape. No files: see ``score_files``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from normdiff_bids.conventions import ROW_ID_COLUMNS
from normdiff_bids.outputs import names
from normdiff_bids.outputs.regions import describe_idp

#: Identifier columns, in the order they lead every table (``row`` when the input had no ids).
ID_COLUMNS: tuple[str, ...] = ROW_ID_COLUMNS
#: Per-subject score columns of the wide table, in order.
SUBJECT_SCORE_COLUMNS: tuple[str, ...] = ("joint_stat", "joint_centile", "joint_z", "extrapolated",
                                          "unknown_site", "joint_n_idps", "cond_given_missing")
#: Per-IDP score fields of the wide table, in order (``<idp>_<field>``); the conditional ones exist only
#: for the IDPs that were not given.
IDP_FIELDS: tuple[str, ...] = ("value", "centile", "z", "tail", "cond_centile", "cond_z")
#: The conditional fields of ``IDP_FIELDS`` (absent for the given IDPs).
CONDITIONAL_FIELDS: tuple[str, ...] = ("cond_centile", "cond_z")
#: Columns of the tidy table, in order (ids first).
TIDY_COLUMNS: tuple[str, ...] = ("idp", "value", "centile", "z", "tail", "cond_centile", "cond_z",
                                 "extrapolated", "unknown_site", "joint_stat", "joint_centile", "joint_z",
                                 "joint_n_idps", "cond_given_missing")
#: Per-subject flags, true/false (pandas ``boolean``).
BOOLEAN_COLUMNS: tuple[str, ...] = ("extrapolated", "unknown_site", "cond_given_missing")


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
        if field in CONDITIONAL_FIELDS:  # the given IDPs have none
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
    for col in BOOLEAN_COLUMNS:
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
        elif field in CONDITIONAL_FIELDS and any(c in wide.columns for c in cols):
            long[field] = wide.reindex(columns=cols).to_numpy(dtype="float64").reshape(-1)
    for col in SUBJECT_SCORE_COLUMNS:
        if col in wide.columns:
            long[col] = np.repeat(wide[col].to_numpy(), d)
    for col in BOOLEAN_COLUMNS:
        if col in long.columns:
            long[col] = long[col].astype("boolean")
    return long[[*ids, *[c for c in TIDY_COLUMNS if c in long.columns]]]


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
