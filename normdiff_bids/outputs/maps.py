"""Deviation maps: each region's z painted into the subject's own FreeSurfer segmentation and surfaces.

Volumes: the z of every scored region fills that region's voxels of ``mri/aparc+aseg.mgz`` (NIfTI,
float32, same grid and affine, intent "z score"). ``volume`` paints the aseg structures and the DK
cortical volumes; ``thickness`` and ``area`` the DK cortex labels (1000+/2000+).

Surfaces: the z of each DK region on every vertex of that region in ``label/?h.aparc.annot``
(``.func.gii``), beside the subject's white surface in GIfTI (``surf/?h.white``, shifted from
FreeSurfer's surface RAS to scanner RAS, so it overlays the volume maps as sMRIPrep's surfaces do).

Voxels and vertices with no score (background, structures the model does not score, regions whose
value was missing) are NaN, not 0: z = 0 means "exactly at the median", which an unscored region is not.
"""

from __future__ import annotations

import gzip
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from normdiff_bids.atomic import atomic_write_bytes
from normdiff_bids.bidsio import write_json
from normdiff_bids.data.atlases import DK_REGIONS
from normdiff_bids.errors import InputError
from normdiff_bids.outputs import names
from normdiff_bids.outputs.dataset import bids_uri
from normdiff_bids.outputs.regions import MAP_MEASURES, regions_of_measure
from normdiff_bids.outputs.score_tables import z_by_idp

#: Measures with per-vertex maps (DK regions of ``?h.aparc.annot``).
SURFACE_MEASURES: tuple[str, ...] = ("thickness", "area", "volume")
_STRUCTURE = {"lh": "CortexLeft", "rh": "CortexRight"}


# -------------------------------------------------------------------------------------------------------
# volumes
# -------------------------------------------------------------------------------------------------------

def load_label_volume(path: str | os.PathLike) -> tuple[np.ndarray, nib.spatialimages.SpatialImage]:
    """Integer labels and the image of a FreeSurfer label volume (``aparc+aseg.mgz`` or a NIfTI)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"label volume {path} not found; the deviation maps need the subject's "
                         "FreeSurfer mri/aparc+aseg.mgz (run recon-all, or pass --fs-dir)")
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises several types for damaged files
        raise InputError(f"label volume {path} cannot be read ({err}); it looks damaged: "
                         "re-create it with FreeSurfer") from err
    if data.ndim != 3:
        raise InputError(f"label volume {path} has shape {data.shape}; a 3-D label volume is expected")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise InputError(f"label volume {path} holds non-integer values; it is not a segmentation")
    return data.astype(np.int64, copy=False), img


def paint_labels(labels: np.ndarray, values: Mapping[int, float], background: float = np.nan) -> np.ndarray:
    """float32 array like ``labels``: ``values[label]`` on each labelled voxel, ``background`` elsewhere."""
    out = np.full(labels.shape, background, dtype=np.float32)
    if not values:
        return out
    ids = np.fromiter(values.keys(), dtype=np.int64)
    lut = np.full(int(max(ids.max(), 0)) + 1, background, dtype=np.float32)
    lut[ids] = np.fromiter(values.values(), dtype=np.float32, count=len(ids))
    inside = (labels >= 0) & (labels < lut.size)
    out[inside] = lut[labels[inside]]
    return out


def write_deviation_map(scores_row, aparc_aseg_path: str | os.PathLike, out_path: str | os.PathLike,
                        measure: str, *, background: float = np.nan, source: str | None = None) -> Path:
    """Paint each region's z of ``measure`` into the subject's ``aparc+aseg`` and write it as NIfTI.

    ``scores_row``: one subject's wide row (``<idp>_z`` entries), its tidy rows, or ``{idp: z}``.
    The map has the label volume's grid and affine (float32, intent "z score"); unscored voxels are
    ``background`` (NaN by default). A JSON sidecar beside it lists the painted regions and their z.
    ``source`` names the label volume in the sidecar's ``Sources`` and ``SpatialReference`` (the map
    lies on its grid, in the subject's FreeSurfer space): a BIDS URI such as
    ``bids:freesurfer:sub-01/mri/aparc+aseg.mgz``; default its ``file://`` URI.
    Raises ``ValueError`` when no scored IDP has a region of ``measure``.
    """
    if measure not in MAP_MEASURES:
        raise ValueError(f"measure {measure!r} has no deviation map; use one of {MAP_MEASURES}")
    z = z_by_idp(scores_row)
    regions = regions_of_measure(z, measure)
    if not regions:
        raise ValueError(f"none of the scored IDPs is a {measure} of an aparc+aseg region, so there is "
                         f"no {measure} map to draw")
    labels, img = load_label_volume(aparc_aseg_path)
    source = source or Path(aparc_aseg_path).resolve().as_uri()
    counts = np.bincount(labels[labels >= 0].ravel())
    values = {label: z[idp] for idp, label in regions.items()}
    painted = paint_labels(labels, values, background)

    nifti = nib.Nifti1Image(painted, img.affine)
    header = nifti.header
    header.set_data_dtype(np.float32)
    header.set_xyzt_units("mm")
    header.set_intent("z score")
    # FreeSurfer volumes keep the scanner's RAS coordinates.
    nifti.set_qform(img.affine, code=1)
    nifti.set_sform(img.affine, code=1)
    finite = np.abs(np.array([v for v in values.values() if np.isfinite(v)] or [0.0]))
    header["cal_max"] = float(max(3.0, finite.max()))
    header["cal_min"] = -float(header["cal_max"])
    header["descrip"] = f"normdiff-bids {measure} z".encode()[:79]

    out_path = Path(out_path)
    atomic_write_bytes(out_path, _nifti_bytes(nifti, compress=out_path.name.endswith(".gz")))
    sidecar = {
        "Description": f"Normative deviation (z) of each region's {measure}, painted into the subject's "
                       "FreeSurfer aparc+aseg label volume",
        "Measure": measure,
        "Units": "standard deviation",
        "Background": "NaN: voxels outside every scored region (z = 0 would mean 'at the median')"
                      if np.isnan(background) else f"{background}: voxels outside every scored region",
        "Sources": [source],
        "SpatialReference": source,
        "Regions": {idp: {"label": int(label), "z": z[idp], "voxels": _count(counts, label)}
                    for idp, label in regions.items()},
        "RegionsNotInLabelVolume": sorted(idp for idp, label in regions.items() if not _count(counts, label)),
    }
    write_json(_sidecar_path(out_path), sidecar)  # a NaN z (region not scored) is written as null
    return out_path


def _nifti_bytes(img: nib.Nifti1Image, compress: bool) -> bytes:
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if compress else raw


def _sidecar_path(path: Path) -> Path:
    name = path.name
    for ext in (".nii.gz", ".func.gii", ".surf.gii", ".nii"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".json")
    return path.with_suffix(".json")


def _count(counts: np.ndarray, label: int) -> int:
    return int(counts[label]) if label < counts.size else 0


# -------------------------------------------------------------------------------------------------------
# surfaces
# -------------------------------------------------------------------------------------------------------

def read_annot_regions(annot_path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Per-vertex index into the region names of a FreeSurfer ``.annot`` (-1: no region), and the names."""
    annot_path = Path(annot_path)
    if not annot_path.is_file():
        raise InputError(f"annotation {annot_path} not found")
    try:
        labels, _ctab, region_names = nib.freesurfer.read_annot(annot_path)
    except Exception as err:
        raise InputError(
            f"annotation {annot_path} cannot be read ({err}); re-create it with FreeSurfer") from err
    return np.asarray(labels, dtype=np.int64), [n.decode() if isinstance(n, bytes) else str(n)
                                                for n in region_names]


def vertex_values(z: Mapping[str, float], annot_path: str | os.PathLike, measure: str,
                  hemi: str) -> np.ndarray:
    """z of ``<hemi>_<region>_<measure>`` on each vertex of its DK region; NaN elsewhere."""
    labels, region_names = read_annot_regions(annot_path)
    per_name = np.full(len(region_names) + 1, np.nan, dtype=np.float32)  # last slot: label -1
    for i, region in enumerate(region_names):
        value = z.get(f"{hemi}_{region}_{measure}") if region in DK_REGIONS else None
        if value is not None:
            per_name[i] = value
    return per_name[np.where(labels >= 0, labels, len(region_names))]


def write_surface_deviation_map(scores_row, annot_path: str | os.PathLike, out_path: str | os.PathLike,
                                measure: str, hemi: str, *, n_vertices: int | None = None) -> Path:
    """Write the per-vertex z of ``measure`` on one hemisphere as a ``.func.gii`` (float32, intent z score).

    Each vertex gets the z of its DK region in ``annot_path`` (``label/?h.aparc.annot``); vertices outside
    the scored regions are NaN. ``n_vertices`` (the surface's) is checked against the annotation.
    """
    if hemi not in _STRUCTURE:
        raise ValueError(f"hemi must be 'lh' or 'rh', got {hemi!r}")
    if measure not in SURFACE_MEASURES:
        raise ValueError(f"measure {measure!r} has no surface map; use one of {SURFACE_MEASURES}")
    z = z_by_idp(scores_row)
    if not any(f"{hemi}_{region}_{measure}" in z for region in DK_REGIONS):
        raise ValueError(f"no {hemi} DK {measure} IDP was scored, so there is no surface map to draw")
    values = vertex_values(z, annot_path, measure, hemi)
    if n_vertices is not None and values.size != n_vertices:
        raise InputError(f"annotation {annot_path} has {values.size} vertices but the surface has "
                         f"{n_vertices}; they do not belong to the same FreeSurfer subject")
    meta = {"AnatomicalStructurePrimary": _STRUCTURE[hemi], "Name": f"{measure} z",
            "Description": f"normdiff-bids normative deviation (z) of each DK region's {measure}; "
                           "NaN = unscored"}
    array = nib.gifti.GiftiDataArray(values.astype(np.float32), intent="NIFTI_INTENT_ZSCORE",
                                     datatype="NIFTI_TYPE_FLOAT32",
                                     meta=nib.gifti.GiftiMetaData(meta))
    gifti = nib.gifti.GiftiImage(darrays=[array],
                                 meta=nib.gifti.GiftiMetaData(AnatomicalStructurePrimary=_STRUCTURE[hemi]))
    out_path = Path(out_path)
    atomic_write_bytes(out_path, gifti.to_xml())
    return out_path


def write_surface(white_path: str | os.PathLike, out_path: str | os.PathLike, hemi: str,
                  *, aparc_aseg_path: str | os.PathLike | None = None) -> Path:
    """Write a FreeSurfer surface (``surf/?h.white``) as ``.surf.gii`` in scanner RAS coordinates.

    FreeSurfer stores vertices in surface ("tkregister") RAS; the shift to scanner RAS comes from the
    surface's own volume geometry (``cras``) or, failing that, from the label volume's header. Without
    either the coordinates stay in surface RAS, which the file's metadata says.
    """
    white_path = Path(white_path)
    if not white_path.is_file():
        raise InputError(f"surface {white_path} not found")
    try:
        with warnings.catch_warnings():
            # Surfaces without volume geometry are handled below (the label volume gives the shift).
            warnings.filterwarnings("ignore", message="No volume information", category=UserWarning)
            warnings.filterwarnings("ignore", message="Unknown extension code", category=UserWarning)
            coords, faces, volume_info = nib.freesurfer.read_geometry(white_path, read_metadata=True)
    except Exception as err:
        raise InputError(
            f"surface {white_path} cannot be read ({err}); re-create it with FreeSurfer") from err
    coords = np.asarray(coords, dtype=np.float64)
    space = "surface RAS (FreeSurfer tkregister)"
    if volume_info and "cras" in volume_info:
        coords = coords + np.asarray(volume_info["cras"], dtype=np.float64)
        space = "scanner RAS"
    elif aparc_aseg_path is not None:
        header = nib.load(aparc_aseg_path).header
        if hasattr(header, "get_vox2ras_tkr"):
            tkr_to_scanner = header.get_vox2ras() @ np.linalg.inv(header.get_vox2ras_tkr())
            coords = nib.affines.apply_affine(tkr_to_scanner, coords)
            space = "scanner RAS"
    pointset = nib.gifti.GiftiDataArray(
        coords.astype(np.float32), intent="NIFTI_INTENT_POINTSET", datatype="NIFTI_TYPE_FLOAT32",
        meta=nib.gifti.GiftiMetaData(AnatomicalStructurePrimary=_STRUCTURE[hemi],
                                     AnatomicalStructureSecondary="GrayWhite", GeometricType="Anatomical",
                                     CoordinateSpace=space))
    if space == "scanner RAS":
        pointset.coordsys = nib.gifti.GiftiCoordSystem(dataspace=1, xformspace=1, xform=np.eye(4))
    triangles = nib.gifti.GiftiDataArray(np.asarray(faces, dtype=np.int32), intent="NIFTI_INTENT_TRIANGLE",
                                         datatype="NIFTI_TYPE_INT32")
    gifti = nib.gifti.GiftiImage(darrays=[pointset, triangles],
                                 meta=nib.gifti.GiftiMetaData(AnatomicalStructurePrimary=_STRUCTURE[hemi]))
    out_path = Path(out_path)
    atomic_write_bytes(out_path, gifti.to_xml())
    return out_path


# -------------------------------------------------------------------------------------------------------
# all maps of one subject
# -------------------------------------------------------------------------------------------------------

def write_deviation_maps(output_dir: str | os.PathLike, scores_row, fs_subject_dir: str | os.PathLike,
                         *, entities: Mapping[str, object] | None = None,
                         measures: Iterable[str] = MAP_MEASURES,
                         surfaces: bool = True) -> dict[str, list[Path]]:
    """Write every deviation map of one subject[/session] into the derivatives folder.

    ``fs_subject_dir`` is the subject's FreeSurfer folder (``mri/aparc+aseg.mgz``; optionally
    ``surf/?h.white`` and ``label/?h.aparc.annot`` for per-vertex maps). ``entities`` default to the
    row's ``participant_id`` / ``session_id``. Measures the model does not score are skipped; surfaces
    are skipped when their files are absent. Returns ``{"volume": [...], "thickness": [...], ...,
    "surfaces": [...]}`` with the written paths (maps first, then their sidecars).
    """
    output_dir = Path(output_dir)
    fs_subject_dir = Path(fs_subject_dir)
    if entities is None:
        entities = _entities_of(scores_row)
    z = z_by_idp(scores_row)
    aparc_aseg = fs_subject_dir / "mri" / "aparc+aseg.mgz"
    source = bids_uri(output_dir, aparc_aseg)  # through the dataset's DatasetLinks when it can
    written: dict[str, list[Path]] = {}
    for measure in measures:
        if not regions_of_measure(z, measure):
            continue
        out = output_dir / names.deviation_map_path(entities, measure)
        write_deviation_map(z, aparc_aseg, out, measure, source=source)
        written[measure] = [out, _sidecar_path(out)]
    if not surfaces:
        return written
    for hemi in ("lh", "rh"):
        white = fs_subject_dir / "surf" / f"{hemi}.white"
        annot = fs_subject_dir / "label" / f"{hemi}.aparc.annot"
        if not (white.is_file() and annot.is_file()):
            continue
        hemi_measures = [m for m in measures if m in SURFACE_MEASURES
                         and any(f"{hemi}_{r}_{m}" in z for r in DK_REGIONS)]
        if not hemi_measures:
            continue
        surf_out = write_surface(white, output_dir / names.surface_path(entities, hemi), hemi,
                                 aparc_aseg_path=aparc_aseg if aparc_aseg.is_file() else None)
        n_vertices = nib.load(surf_out).darrays[0].data.shape[0]
        written.setdefault("surfaces", []).append(surf_out)
        for measure in hemi_measures:
            out = output_dir / names.surface_map_path(entities, measure, hemi)
            write_surface_deviation_map(z, annot, out, measure, hemi, n_vertices=n_vertices)
            written.setdefault(measure, []).append(out)
    return written


def _entities_of(scores_row) -> dict[str, str]:
    if isinstance(scores_row, pd.DataFrame):
        scores_row = scores_row.iloc[0]
    if not isinstance(scores_row, pd.Series) or "participant_id" not in scores_row.index:
        raise ValueError("pass entities= (the row has no participant_id)")
    return names.subject_entities(scores_row["participant_id"], scores_row.get("session_id"))
