"""The IDP table: one row per participant (and session) with covariates and selected FreeSurfer IDPs.

:func:`collect_idps` is the one entry the BIDS-App and the ``CollectIDPs`` Nipype interface call. IDP
selection understands named sets (:data:`IDP_SETS`), comma-separated combinations, explicit names and
shell-style globs.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from normdiff_bids.conventions import clean_labels, preview
from normdiff_bids.covariate_spec import CovariateSpecs
from normdiff_bids.data.atlases import (
    ASEG_LABELS,
    BA_EXVIVO_REGIONS,
    DESTRIEUX_REGIONS,
    DK_REGIONS,
    DKT_REGIONS,
    HEMISPHERES,
)
from normdiff_bids.data.bids import (
    FREESURFER_LOCATIONS,
    CovariateColumns,
    _check_bids_dir,
    bids_subjects_sessions,
    find_freesurfer_dir,
    list_freesurfer_subjects,
    match_freesurfer_subject,
    read_covariates,
)
from normdiff_bids.data.freesurfer import SURFACE_MEASURES, read_subject_stats
from normdiff_bids.errors import InputError, ProblemCollector

#: aseg structures FreeSurfer >= 6 reports but always as 0 (their labels are no longer produced), so they
#: carry no information and are left out of the ``aseg`` set (``aseg-all`` keeps them).
ASEG_ALWAYS_ZERO: tuple[str, ...] = (
    "5th-Ventricle", "Left-WM-hypointensities", "Right-WM-hypointensities", "non-WM-hypointensities",
    "Left-non-WM-hypointensities", "Right-non-WM-hypointensities",
)

#: Whole-brain measures of the ``global`` set.
GLOBAL_IDPS: tuple[str, ...] = (
    "EstimatedTotalIntraCranialVol", "BrainSegVol", "BrainSegVolNotVent", "CortexVol", "lhCortexVol",
    "rhCortexVol", "CerebralWhiteMatterVol", "lhCerebralWhiteMatterVol", "rhCerebralWhiteMatterVol",
    "SubCortGrayVol", "TotalGrayVol", "SupraTentorialVol", "lh_MeanThickness_thickness",
    "rh_MeanThickness_thickness", "lh_WhiteSurfArea_area", "rh_WhiteSurfArea_area",
)

_ATLAS_REGIONS = {"aparc": DK_REGIONS, "a2009s": DESTRIEUX_REGIONS, "DKTatlas": DKT_REGIONS,
                  "pial": DK_REGIONS, "BA_exvivo": BA_EXVIVO_REGIONS, "BA_exvivo.thresh": BA_EXVIVO_REGIONS}
#: Parcellation tag in IDP names -> stats file stem (``lh.<stem>.stats``).
_ATLAS_FILES = {"aparc": "aparc", "a2009s": "aparc.a2009s", "DKTatlas": "aparc.DKTatlas",
                "pial": "aparc.pial", "BA_exvivo": "BA_exvivo", "BA_exvivo.thresh": "BA_exvivo.thresh"}


def _parcellation_names(atlas: str, measure: str) -> list[str]:
    tag = "" if atlas == "aparc" else f"{atlas}_"
    return [f"{hemi}_{tag}{region}_{measure}" for hemi in HEMISPHERES for region in _ATLAS_REGIONS[atlas]]


def _build_sets() -> dict[str, list[str]]:
    sets: dict[str, list[str]] = {
        "aseg": [n for n in ASEG_LABELS if n not in ASEG_ALWAYS_ZERO],
        "aseg-all": list(ASEG_LABELS),
        "global": list(GLOBAL_IDPS),
    }
    for atlas in _ATLAS_REGIONS:
        for measure in SURFACE_MEASURES:
            sets[f"{atlas}-{measure}"] = _parcellation_names(atlas, measure)
        sets[atlas] = [n for m in ("thickness", "area", "volume") for n in sets[f"{atlas}-{m}"]]
    return sets


#: Named IDP sets: ``aseg``, ``aseg-all``, ``global``, ``wmparc`` (the ``wm-*`` volumes found), and for each
#: parcellation (``aparc`` = Desikan-Killiany, ``a2009s``, ``DKTatlas``, ``pial``, ``BA_exvivo``,
#: ``BA_exvivo.thresh``) ``<atlas>-<measure>`` with measure in thickness, area, volume, thicknessstd,
#: meancurv, and ``<atlas>`` alone for thickness + area + volume. ``all`` is every set but ``aseg-all``.
IDP_SETS: dict[str, list[str]] = _build_sets()

_SET_FILES = {"aseg": ["aseg.stats"], "aseg-all": ["aseg.stats"],
              "global": ["aseg.stats", "brainvol.stats", "lh.aparc.stats", "rh.aparc.stats"],
              "wmparc": ["wmparc.stats"]}


def available_idp_sets() -> list[str]:
    """Names accepted by :func:`select_idps` (besides explicit IDP names and globs)."""
    return sorted([*IDP_SETS, "wmparc", "all"])


def _split_selection(idp_set: str | Iterable[str]) -> list[str]:
    items = [idp_set] if isinstance(idp_set, str) else list(idp_set)
    out = []
    for item in items:
        out.extend(part.strip() for part in str(item).split(",") if part.strip())
    return out


def stats_files_for(idp_set: str | Iterable[str]) -> list[str] | None:
    """The stats files a selection needs (None: every recognised file, for names and globs)."""
    files: list[str] = []
    for item in _split_selection(idp_set):
        if item in _SET_FILES:
            files += _SET_FILES[item]
        elif item in IDP_SETS:
            atlas = item.split("-")[0] if item.split("-")[-1] in SURFACE_MEASURES else item
            files += [f"{h}.{_ATLAS_FILES[atlas]}.stats" for h in HEMISPHERES]
        else:
            return None
    return list(dict.fromkeys(files))


def select_idps(idp_set: str | Iterable[str], available: Sequence[str]) -> list[str]:
    """Resolve a selection against the IDP names found in the data, keeping the set's own order.

    Named sets keep the members that were found (an empty set is an error); explicit names must exist;
    globs (``lh_*_thickness``) must match at least one name. Unknown items raise one InputError naming
    them all, with the closest names found.
    """
    available = list(dict.fromkeys(available))
    present = set(available)
    problems = ProblemCollector()
    out: list[str] = []
    items = _split_selection(idp_set)
    if not items:
        raise InputError("the IDP selection is empty; name a set (e.g. 'aseg'), IDPs or globs")
    for item in items:
        if item == "all":
            names = [n for key, members in IDP_SETS.items() if key != "aseg-all" for n in members]
            names += [n for n in available if n.startswith("wm-") or n.endswith("UnsegmentedWhiteMatter")]
            out.extend(n for n in names if n in present)
        elif item == "wmparc":
            chosen = [n for n in available if n.startswith("wm-") or n.endswith("UnsegmentedWhiteMatter")]
            if not chosen:
                problems.add("IDP set 'wmparc' selects nothing: no wmparc.stats was read")
            out.extend(chosen)
        elif item in IDP_SETS:
            chosen = [n for n in IDP_SETS[item] if n in present]
            if not chosen:
                problems.add(f"IDP set {item!r} selects nothing: none of its IDPs were found (are the "
                             f"stats files it needs, {stats_files_for(item)}, present?)")
            out.extend(chosen)
        elif any(ch in item for ch in "*?["):
            chosen = [n for n in available if fnmatch.fnmatchcase(n, item)]
            if not chosen:
                problems.add(f"IDP pattern {item!r} matches no IDP found in the data")
            out.extend(chosen)
        elif item in present:
            out.append(item)
        else:
            close = difflib.get_close_matches(item, available + list(IDP_SETS), n=3)
            hint = f"; closest: {close}" if close else ""
            problems.add(f"IDP or set {item!r} is unknown: not a set ({', '.join(available_idp_sets())}) "
                         f"and not found in the data{hint}")
    problems.raise_if_any(header="the IDP selection cannot be resolved")
    return list(dict.fromkeys(out))


def collect_idps(bids_dir: str | Path, fs_dir: str | Path | None = None,
                 participant_label: Sequence[str] | None = None, session_label: Sequence[str] | None = None,
                 idp_set: str | Sequence[str] = "aseg", age_column: str = "age", sex_column: str = "sex",
                 site_column: str | None = "site", longitudinal: bool = False,
                 covariates: CovariateSpecs | Sequence[Mapping] | None = None) -> tuple[pd.DataFrame, dict]:
    """Collect covariates and FreeSurfer IDPs of a BIDS dataset into one table.

    Returns ``(table, report)``. ``table`` has one row per participant (and per session when the dataset
    has sessions) with FreeSurfer outputs: ``participant_id``, ``session_id`` (only when the dataset has
    sessions), the covariates under their names (``age``, ``sex``, ``site`` whatever the source columns,
    then any other covariate under its column's name), then the selected IDPs (float, NaN where missing).
    ``report`` is a JSON-ready dict: folders used, rows without FreeSurfer outputs, missing IDPs and
    covariates per row, skipped folders, and the covariates read (``covariates``: the specification with
    every kind known, :meth:`CovariateSpecs.to_list <normdiff_bids.covariate_spec.CovariateSpecs.to_list>`).

    ``covariates``: the covariates to read (:class:`~normdiff_bids.covariate_spec.CovariateSpecs` or its
    list form); without it, age, sex and site from ``age_column``, ``sex_column`` and ``site_column``
    (``None``: no site), which must then be left as they are.

    Every problem of the cohort (unreadable stats files, bad covariates, unknown labels, a FreeSurfer
    folder matching no BIDS subject) is gathered and raised together as one InputError.
    """
    bids_dir = _check_bids_dir(bids_dir)
    problems = ProblemCollector()
    columns = _covariate_spec(covariates, age_column, sex_column, site_column)
    subjects_sel = _labels(participant_label, "sub", problems)
    sessions_sel = _labels(session_label, "ses", problems)
    problems.raise_if_any(header="the participant/session selection is not valid")

    subjects = bids_subjects_sessions(bids_dir)
    if not subjects:
        raise InputError(f"{bids_dir}: no sub-<label> folders found; is this the raw BIDS dataset?")
    if subjects_sel is not None:
        unknown = [s for s in subjects_sel if f"sub-{s}" not in subjects]
        for s in unknown:
            problems.add(f"participant label {s!r}: no sub-{s} in {bids_dir} (participants are "
                         f"{preview(subjects, n=6)})")
        subjects = {k: v for k, v in subjects.items() if k.removeprefix("sub-") in subjects_sel}
        if not subjects:
            problems.raise_if_any(header="the participant selection matches no participant")
    has_sessions = any(subjects.values())
    if sessions_sel is not None and has_sessions:
        all_sessions = {s for v in subjects.values() for s in v}
        for s in sessions_sel:
            if f"ses-{s}" not in all_sessions:
                problems.add(f"session label {s!r}: no ses-{s} for the selected participants (sessions are "
                             f"{preview(sorted(all_sessions), n=6)})")

    covariates = read_covariates(bids_dir, subjects, columns, problems)
    participants = covariates.participants.set_index("participant_id", drop=False)
    for sub in subjects:
        if sub not in participants.index:
            problems.add(f"{bids_dir / 'participants.tsv'}: no row for {sub}; add one with its covariates")

    fs_root = find_freesurfer_dir(bids_dir, fs_dir)
    if fs_root is None:
        looked = ", ".join(str(bids_dir / p) for p in FREESURFER_LOCATIONS)
        problems.add(f"no FreeSurfer folder found: looked in {looked}; pass --fs-dir")
        problems.raise_if_any(header=f"inputs of {bids_dir} could not be collected")
    folders = list_freesurfer_subjects(fs_root)

    # Rows: (participant, session) pairs of the selection.
    rows: list[tuple[str, str | None]] = []
    for sub, sessions in subjects.items():
        if has_sessions:
            for ses in sessions or [None]:
                if sessions_sel is None or (ses is not None and ses.removeprefix("ses-") in sessions_sel):
                    rows.append((sub, ses))
        else:
            rows.append((sub, None))

    index = folders.longitudinal if longitudinal else folders.cross
    if index and not any(match_freesurfer_subject(folders, sub, ses, len(subjects[sub]), longitudinal)
                         for sub, ses in rows):
        problems.add(f"FreeSurfer folder {fs_root} has no subject matching the BIDS subjects: it holds "
                     f"{preview(sorted(p.path.name for p in index.values()), n=6)}, the dataset has "
                     f"{preview(list(subjects), n=6)}; check --fs-dir")
    elif not index:
        kind = "longitudinal (<tp>.long.<base>)" if longitudinal else "sub-<label>[_ses-<label>]"
        other = folders.cross if longitudinal else folders.longitudinal
        hint = "check --fs-dir"
        if other:
            found = "cross-sectional" if longitudinal else "longitudinal"
            flag = "leave out --longitudinal" if longitudinal else "pass --longitudinal"
            seen = preview(sorted(p.path.name for p in other.values()), n=3)
            hint = f"it holds {found} folders ({seen}): {flag} to read them, or check --fs-dir"
        problems.add(f"FreeSurfer folder {fs_root} holds no {kind} subject folders; {hint}")

    files = stats_files_for(idp_set)
    records: list[dict] = []
    no_freesurfer: list[str] = []
    versions: dict[str, str] = {}
    for sub, ses in rows:
        row_id = sub + (f"_{ses}" if ses else "")
        fs_subject = match_freesurfer_subject(folders, sub, ses, len(subjects[sub]), longitudinal)
        if fs_subject is None:
            no_freesurfer.append(row_id)
            continue
        try:
            stats = read_subject_stats(fs_subject.path / "stats", files=files)
        except InputError as exc:
            problems.extend(f"{row_id}: {p}" for p in exc.problems)
            continue
        versions[row_id] = stats.version
        records.append({"participant_id": sub, "session_id": ses, "fs_subject": fs_subject.path.name,
                        **stats.idps})
    problems.raise_if_any(header=f"inputs of {bids_dir} could not be collected")

    available = [k for rec in records for k in rec if k not in ("participant_id", "session_id", "fs_subject")]
    selected = select_idps(idp_set, available) if records else []
    covariates.spec.check_names(selected, "an IDP of the selection")
    table = _assemble(records, selected, participants, covariates.sessions, has_sessions, covariates.spec)

    report = {
        "bids_dir": str(bids_dir),
        "fs_dir": str(fs_root),
        "longitudinal": bool(longitudinal),
        "n_rows": int(len(table)),
        "idp_set": _split_selection(idp_set),
        "idps": selected,
        "no_freesurfer": no_freesurfer,
        "missing_idps": _missing_per_row(table, selected),
        "missing_idps_count": {c: int(table[c].isna().sum()) for c in selected if table[c].isna().any()},
        "missing_covariates": _missing_per_row(table, [c for c in covariates.spec.names if c in table]),
        "covariates": covariates.spec.to_list(),
        "skipped_folders": folders.skipped,
        # The other kind of folder (longitudinal or cross-sectional) is never mixed in: list it.
        "ignored_folders": sorted(p.path.name for p in (folders.cross if longitudinal
                                                        else folders.longitudinal).values()),
        "fs_versions": versions,
    }
    return table, report


def _labels(values, entity: str, problems: ProblemCollector) -> list[str] | None:
    if values is None:
        return None
    values = [values] if isinstance(values, str) else list(values)
    if not values:
        return None
    labels, bad = clean_labels(values, entity)
    problems.extend(bad)
    return labels


def _covariate_spec(covariates, age_column: str, sex_column: str, site_column: str | None) -> CovariateSpecs:
    columns = CovariateColumns(age=age_column, sex=sex_column, site=site_column)
    if covariates is None:
        return columns.spec()
    if columns != CovariateColumns():
        raise InputError(f"collect_idps takes the covariates either as age_column/sex_column/site_column "
                         f"({columns}) or as covariates=, not both; give the role columns in the "
                         f"specification (CovariateSpecs.from_options)")
    return CovariateSpecs.coerce(covariates)


def _assemble(records: list[dict], selected: list[str], participants: pd.DataFrame,
              sessions: pd.DataFrame | None, has_sessions: bool, spec: CovariateSpecs) -> pd.DataFrame:
    ids = ["participant_id"] + (["session_id"] if has_sessions else [])
    cov_names = list(spec.names)
    age = spec.name_of("age")
    base = pd.DataFrame([{k: r[k] for k in ("participant_id", "session_id")} for r in records],
                        columns=["participant_id", "session_id"])
    cov = participants.reindex(base["participant_id"])[
        [c for c in cov_names if c in participants.columns]].reset_index(drop=True)
    for c in cov_names:
        if c not in cov.columns:
            cov[c] = np.nan
    if age is not None and sessions is not None and has_sessions:
        per_visit = sessions.set_index(["participant_id", "session_id"])["age"]
        keys = list(zip(base["participant_id"], base["session_id"]))
        visit_age = np.array([per_visit.get(k, np.nan) for k in keys], dtype=float)
        cov[age] = np.where(np.isnan(visit_age), cov[age].to_numpy(dtype=float), visit_age)
    for name in spec.of_kind("continuous"):
        cov[name] = cov[name].astype(float)
    values = pd.DataFrame([{k: r.get(k, np.nan) for k in selected} for r in records], columns=selected,
                          dtype=float)
    table = pd.concat([base[ids], cov[cov_names], values], axis=1)
    return table.reset_index(drop=True)


def _missing_per_row(table: pd.DataFrame, names: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    if not names or table.empty:
        return out
    has_session = "session_id" in table.columns
    isna = table[names].isna().to_numpy()
    for i in np.flatnonzero(isna.any(axis=1)):
        row = table.iloc[i]
        row_id = row["participant_id"] + (f"_{row['session_id']}" if has_session and
                                          isinstance(row["session_id"], str) else "")
        out[row_id] = [n for n, missing in zip(names, isna[i]) if missing]
    return out
