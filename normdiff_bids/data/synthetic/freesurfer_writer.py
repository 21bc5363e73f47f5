"""FreeSurfer stats files of a synthetic subject, the mirror of the reader ``data/freesurfer.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from normdiff_bids.data.atlases import ASEG_LABELS, DK_REGIONS, HEMISPHERES
from normdiff_bids.data.freesurfer import FS7_TO_FS6
from normdiff_bids.data.synthetic.files import write_text
from normdiff_bids.data.synthetic.geometry import write_annot, write_aparc_aseg, write_white_surface
from normdiff_bids.data.synthetic.resources import table_json, table_rows

#: The stats files' fixed lines (``fs_layout.json``): per FreeSurfer version the programs' ``cvs_version``,
#: per file the ``# Measure`` order and the header lines (``{label}``, ``{hemi}``, ``{cvs_version}`` to fill).
_LAYOUT = table_json("fs_layout.json")
#: ``# Measure`` definitions (``fs_measures.tsv``); ``value`` names the global measure written, or ``a / b``.
_MEASURES = {row["key"]: row for row in table_rows("fs_measures.tsv")}
#: Table columns of aseg.stats and ?h.aparc.stats (``fs_table_columns.tsv``): (ColHeader, FieldName, Units).
_COLUMNS = {kind: [(row["column_header"], row["field_name"], row["units"])
                   for row in table_rows("fs_table_columns.tsv") if row["file"] == kind]
            for kind in ("aseg", "aparc")}


def write_freesurfer_subject(subject_dir: Path, label: str, values: pd.Series, visit: pd.Series,
                             rng: np.random.Generator, surfaces: tuple[np.ndarray, np.ndarray]) -> None:
    """One subject's ``stats/``, ``mri/aparc+aseg.mgz``, ``surf/?h.white`` and ``label/?h.aparc.annot``."""
    version = str(visit["fs_version"])
    aseg = {name: float(values[name]) if name in values.index else 0.0 for name in ASEG_LABELS}
    regions = {hemi: {r: (float(values[f"{hemi}_{r}_thickness"]), float(values[f"{hemi}_{r}_area"]),
                          float(values[f"{hemi}_{r}_volume"])) for r in DK_REGIONS} for hemi in HEMISPHERES}
    measures = _global_measures(aseg, regions, float(visit["age"]), rng)
    stats = subject_dir / "stats"
    write_text(stats / "aseg.stats", _format_aseg(label, aseg, measures, version, rng))
    write_text(stats / "brainvol.stats", _format_brainvol(measures))
    for hemi in HEMISPHERES:
        write_text(stats / f"{hemi}.aparc.stats",
                   _format_aparc(label, hemi, regions[hemi], measures, version, rng))
    write_aparc_aseg(subject_dir / "mri" / "aparc+aseg.mgz", rng)
    vertices, faces = surfaces
    for hemi in HEMISPHERES:
        write_white_surface(subject_dir / "surf" / f"{hemi}.white", vertices, faces, hemi, label)
        write_annot(subject_dir / "label" / f"{hemi}.aparc.annot", vertices, rng)


#: aseg structures (Left- and Right-) summed into SubCortGray, and those summed into VentricleChoroidVol.
_SUBCORTICAL_GRAY = ("Thalamus", "Caudate", "Putamen", "Pallidum", "Hippocampus", "Amygdala",
                     "Accumbens-area", "VentralDC")
_VENTRICLES = ("Left-Lateral-Ventricle", "Right-Lateral-Ventricle", "Left-Inf-Lat-Vent",
               "Right-Inf-Lat-Vent", "3rd-Ventricle", "4th-Ventricle", "5th-Ventricle", "Left-choroid-plexus",
               "Right-choroid-plexus")


def _global_measures(aseg: dict[str, float], regions: dict, age: float,
                     rng: np.random.Generator) -> dict[str, float]:
    """Whole-brain measures consistent with the structure volumes, as FreeSurfer derives them."""
    m: dict[str, float] = {}
    for hemi in HEMISPHERES:
        m[f"{hemi}Cortex"] = sum(v for _, _, v in regions[hemi].values()) * rng.uniform(0.99, 1.01)
        wm_age = np.exp(-0.12 * ((age - 45.0) / 40.0) ** 2)
        m[f"{hemi}CerebralWhiteMatter"] = m[f"{hemi}Cortex"] * rng.uniform(0.9, 1.05) * wm_age
    m["Cortex"] = m["lhCortex"] + m["rhCortex"]
    m["CerebralWhiteMatter"] = m["lhCerebralWhiteMatter"] + m["rhCerebralWhiteMatter"]
    m["SubCortGray"] = sum(aseg[f"{side}-{s}"] for side in ("Left", "Right") for s in _SUBCORTICAL_GRAY)
    cerebellum_gray = aseg["Left-Cerebellum-Cortex"] + aseg["Right-Cerebellum-Cortex"]
    cerebellum_white = aseg["Left-Cerebellum-White-Matter"] + aseg["Right-Cerebellum-White-Matter"]
    m["TotalGray"] = m["Cortex"] + m["SubCortGray"] + cerebellum_gray
    m["VentricleChoroidVol"] = sum(aseg[s] for s in _VENTRICLES)
    corpus_callosum = sum(v for k, v in aseg.items() if k.startswith("CC_"))
    m["BrainSeg"] = (m["TotalGray"] + m["CerebralWhiteMatter"] + cerebellum_white + aseg["Brain-Stem"]
                     + m["VentricleChoroidVol"] + corpus_callosum + aseg["WM-hypointensities"])
    m["BrainSegNotVent"] = m["BrainSeg"] - m["VentricleChoroidVol"]
    m["SupraTentorial"] = m["BrainSeg"] - cerebellum_gray - cerebellum_white - aseg["Brain-Stem"]
    m["SupraTentorialNotVent"] = m["SupraTentorial"] - m["VentricleChoroidVol"]
    ratio = np.clip(0.83 - 0.0022 * max(age - 20.0, 0.0) + rng.normal(0.0, 0.02), 0.55, 0.92)
    m["eTIV"] = m["BrainSeg"] / ratio
    m["Mask"] = m["eTIV"] * rng.uniform(1.1, 1.25)
    holes = rng.poisson(20, size=2)
    m["lhSurfaceHoles"], m["rhSurfaceHoles"] = float(holes[0]), float(holes[1])
    m["SurfaceHoles"] = float(holes.sum())
    # The values as written (6 decimals), so derived ratios match what a reader recomputes.
    return {k: round(v, 6) for k, v in m.items()}


def _measure_lines(m: dict[str, float], kind: str, version: str = "7") -> list[str]:
    """``# Measure`` lines in FreeSurfer's order for ``aseg``, ``brainvol`` or ``aparc`` stats files."""
    f = "{:.12f}" if kind == "brainvol" else "{:.6f}"
    lines = []
    for key in _LAYOUT["measure_order"][kind]:
        row = _MEASURES[key]
        numerator, _, denominator = row["value"].partition(" / ")
        value = m[numerator] / m[denominator] if denominator else m[numerator]
        short, name, description, units = row["short_name"], row["name"], row["description"], row["units"]
        number = f"{int(value)}" if "Holes" in key else f.format(value)
        if kind == "aparc" and key == "Cortex" and version == "6":
            # FreeSurfer 6 mris_anatomical_stats drops the comma after this measure's name.
            lines.append(f"# Measure {short}, {name} {description}, {number}, {units}")
        else:
            lines.append(f"# Measure {short}, {name}, {description}, {number}, {units}")
    return lines


def _table_col_lines(columns: list[tuple[str, str, str]]) -> list[str]:
    lines = [f"# NTableCols {len(columns)}"]
    for i, (header, field_name, units) in enumerate(columns, start=1):
        lines += [f"# TableCol {i:2d} ColHeader {header}", f"# TableCol {i:2d} FieldName {field_name}",
                  f"# TableCol {i:2d} Units     {units}"]
    return lines


def _header(kind: str, program: str, version: str, **fields: str) -> list[str]:
    """The file's fixed header lines (``fs_layout.json``) with the label and hemisphere filled in."""
    cvs_version = _LAYOUT["cvs_version"][version][program]
    return [line.format(cvs_version=cvs_version, **fields) for line in _LAYOUT[kind]["header"]]


def _format_aseg(label: str, aseg: dict[str, float], m: dict[str, float], version: str,
                 rng: np.random.Generator) -> str:
    names = {n: (FS7_TO_FS6.get(n, n) if version == "6" else n) for n in ASEG_LABELS}
    lines = [*_header("aseg", "segstats", version, label=label), *_measure_lines(m, "aseg", version),
             *_LAYOUT["aseg"]["after_measures"]]
    columns = _COLUMNS["aseg"]
    table_cols = _table_col_lines(columns)
    # mri_segstats' spacing: NTableCols after the columns, two spaces after ColHeaders and at the end.
    lines += table_cols[1:] + [f"# NRows {len(ASEG_LABELS)} ", table_cols[0] + " ",
                               "# ColHeaders  " + " ".join(header for header, _, _ in columns) + "  "]
    for i, (name, seg_id) in enumerate(ASEG_LABELS.items(), start=1):
        volume = aseg[name]
        if volume > 0:
            n_vox = int(round(volume * rng.uniform(0.97, 1.03)))
            mean = rng.uniform(40.0, 100.0)
            sd, lo = rng.uniform(3.0, 15.0), rng.uniform(10.0, 40.0)
            hi = min(255.0, mean + rng.uniform(15.0, 40.0))
        else:
            n_vox, mean, sd, lo, hi = 0, 0.0, 0.0, 0.0, 0.0
        lines.append(f"{i:3d} {seg_id:3d} {n_vox:9d} {volume:10.1f}  {names[name]:<32s} {mean:10.4f} "
                     f"{sd:10.4f} {round(lo):10.4f} {round(hi):10.4f} {round(hi) - round(lo):10.4f} ")
    return "\n".join(lines) + "\n"


def _format_brainvol(m: dict[str, float]) -> str:
    return "\n".join(_measure_lines(m, "brainvol")) + "\n"


def _format_aparc(label: str, hemi: str, regions: dict[str, tuple[float, float, float]], m: dict[str, float],
                  version: str, rng: np.random.Generator) -> str:
    total_area = sum(a for _, a, _ in regions.values())
    mean_thickness = sum(t * a for t, a, _ in regions.values()) / total_area
    n_vert = {r: int(round(a * rng.uniform(1.35, 1.55))) for r, (_, a, _) in regions.items()}
    lines = [
        *_header("aparc", "surface", version, label=label, hemi=hemi),
        f"# Measure Cortex, NumVert, Number of Vertices, {sum(n_vert.values())}, unitless",
        f"# Measure Cortex, WhiteSurfArea, White Surface Total Area, {total_area:.6g}, mm^2",
        f"# Measure Cortex, MeanThickness, Mean Thickness, {mean_thickness:.6g}, mm",
        *_measure_lines(m, "aparc", version),
        *_table_col_lines(_COLUMNS["aparc"]),
        "# ColHeaders " + " ".join(header for header, _, _ in _COLUMNS["aparc"]),
    ]
    for region, (thickness, area, volume) in regions.items():
        lines.append(
            f"{region:<40s} {n_vert[region]:5d} {int(area):6d} {int(volume):6d} {thickness:6.3f} "
            f"{thickness * rng.uniform(0.15, 0.25):5.3f} {rng.uniform(0.09, 0.15):9.3f} "
            f"{rng.uniform(0.01, 0.04):9.3f} {int(round(area * rng.uniform(0.005, 0.015))):8d} "
            f"{area * rng.uniform(0.0005, 0.0015):7.1f}")
    return "\n".join(lines) + "\n"
