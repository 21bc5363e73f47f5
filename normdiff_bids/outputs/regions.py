"""What an IDP name measures and where it lies: units for sidecars, ``aparc+aseg`` label ids for maps.

The inverse of the naming rules of ``docs/internals.md`` ("IDP names"). Label ids come from
:mod:`normdiff_bids.data.atlases`, the one source of FreeSurfer ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from normdiff_bids.data.atlases import ASEG_LABELS, ASEG_TISSUE_LABELS, DK_REGIONS, HEMISPHERES, dk_label_id

#: Measures that have a deviation map (one NIfTI per measure, painted into ``aparc+aseg``).
MAP_MEASURES: tuple[str, ...] = ("volume", "thickness", "area")

#: Units of the measures FreeSurfer reports, as written in the stats files.
MEASURE_UNITS: dict[str, str] = {
    "volume": "mm^3",
    "thickness": "mm",
    "thicknessstd": "mm",
    "area": "mm^2",
    "meancurv": "mm^-1",
    "gauscurv": "mm^-2",
    "foldind": "n/a",
    "curvind": "n/a",
    "ratio": "n/a",
    "count": "n/a",
}

_DK_MEASURES = ("thickness", "thicknessstd", "area", "volume", "meancurv", "gauscurv", "foldind", "curvind")
_FS7_NAMES = {"Left-Thalamus-Proper": "Left-Thalamus", "Right-Thalamus-Proper": "Right-Thalamus"}


@dataclass(frozen=True)
class IDPInfo:
    """One IDP: its measure and units, and its ``aparc+aseg`` structure when it has one."""

    idp: str
    measure: str                    # volume, thickness, area, ... or "other"
    units: str                      # "mm^3", "mm", ...; "n/a" when unknown or dimensionless
    structure: str | None = None    # aparc+aseg label name, e.g. "Left-Hippocampus", "ctx-lh-insula"
    label_id: int | None = None     # its id in aparc+aseg.mgz
    hemi: str | None = None         # "lh" / "rh" for lateralised structures
    region: str | None = None       # DK region name for cortical IDPs

    @property
    def description(self) -> str:
        if self.region is not None:
            side = "left" if self.hemi == "lh" else "right"
            return f"{self.measure} of the {side} {self.region} ({self.hemi}.aparc.stats, Desikan-Killiany)"
        if self.structure is not None:
            return f"volume of {self.structure} (aseg.stats)"
        return f"{self.idp} ({self.measure})"


@lru_cache(maxsize=4096)
def describe_idp(idp: str) -> IDPInfo:
    """Parse an IDP name into its measure, units and (where it has one) ``aparc+aseg`` label.

    >>> describe_idp("lh_superiorfrontal_thickness").label_id
    1028
    >>> describe_idp("Left-Hippocampus").label_id
    17
    """
    name = _FS7_NAMES.get(idp, idp)
    aseg = {**ASEG_LABELS, **ASEG_TISSUE_LABELS}
    if name in aseg:
        hemi = "lh" if name.startswith("Left-") else "rh" if name.startswith("Right-") else None
        return IDPInfo(idp, "volume", MEASURE_UNITS["volume"], structure=name, label_id=aseg[name], hemi=hemi)
    parts = idp.split("_")
    if len(parts) == 3 and parts[0] in HEMISPHERES and parts[1] in DK_REGIONS and parts[2] in _DK_MEASURES:
        hemi, region, measure = parts
        return IDPInfo(idp, measure, MEASURE_UNITS[measure], structure=f"ctx-{hemi}-{region}",
                       label_id=dk_label_id(hemi, region), hemi=hemi, region=region)
    # Everything else has no aparc+aseg label (whole-brain measures, wmparc, other parcellations).
    if len(parts) >= 2 and parts[0] in HEMISPHERES and parts[-1] in _DK_MEASURES:
        return IDPInfo(idp, parts[-1], MEASURE_UNITS[parts[-1]], hemi=parts[0])
    if idp.endswith("-to-eTIV"):
        return IDPInfo(idp, "ratio", MEASURE_UNITS["ratio"])
    if idp.endswith("SurfaceHoles"):
        return IDPInfo(idp, "count", MEASURE_UNITS["count"])
    if idp.endswith("Vol") or idp.startswith("wm-") or idp == "EstimatedTotalIntraCranialVol":
        return IDPInfo(idp, "volume", MEASURE_UNITS["volume"])
    return IDPInfo(idp, "other", "n/a")


def regions_of_measure(idps, measure: str) -> dict[str, int]:
    """IDPs that can be painted into ``aparc+aseg`` for ``measure``, mapped to their label ids.

    ``volume`` takes the aseg structures and the DK cortical volumes; ``thickness`` and ``area`` the DK
    regions (ids 1000+/2000+).
    """
    if measure not in MAP_MEASURES:
        raise ValueError(f"measure {measure!r} has no deviation map; use one of {MAP_MEASURES}")
    found = {}
    for idp in idps:
        info = describe_idp(idp)
        if info.measure == measure and info.label_id is not None:
            found[idp] = info.label_id
    return found
