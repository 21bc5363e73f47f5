"""FreeSurfer label tables used across the package: one source of truth for structure names and ids.

Numbers are those of FreeSurfer's ``FreeSurferColorLUT.txt`` (the ids written into ``aseg.mgz`` and
``aparc+aseg.mgz``). Names use the FreeSurfer 7 spelling; :data:`FS6_TO_FS7` (in
:mod:`normdiff_bids.data.freesurfer`) harmonises older spellings onto these.
"""

from __future__ import annotations

#: Structures reported in ``aseg.stats`` (FreeSurfer 7 names) and their segmentation ids.
ASEG_LABELS: dict[str, int] = {
    "Left-Lateral-Ventricle": 4,
    "Left-Inf-Lat-Vent": 5,
    "Left-Cerebellum-White-Matter": 7,
    "Left-Cerebellum-Cortex": 8,
    "Left-Thalamus": 10,
    "Left-Caudate": 11,
    "Left-Putamen": 12,
    "Left-Pallidum": 13,
    "3rd-Ventricle": 14,
    "4th-Ventricle": 15,
    "Brain-Stem": 16,
    "Left-Hippocampus": 17,
    "Left-Amygdala": 18,
    "CSF": 24,
    "Left-Accumbens-area": 26,
    "Left-VentralDC": 28,
    "Left-vessel": 30,
    "Left-choroid-plexus": 31,
    "Right-Lateral-Ventricle": 43,
    "Right-Inf-Lat-Vent": 44,
    "Right-Cerebellum-White-Matter": 46,
    "Right-Cerebellum-Cortex": 47,
    "Right-Thalamus": 49,
    "Right-Caudate": 50,
    "Right-Putamen": 51,
    "Right-Pallidum": 52,
    "Right-Hippocampus": 53,
    "Right-Amygdala": 54,
    "Right-Accumbens-area": 58,
    "Right-VentralDC": 60,
    "Right-vessel": 62,
    "Right-choroid-plexus": 63,
    "5th-Ventricle": 72,
    "WM-hypointensities": 77,
    "Left-WM-hypointensities": 78,
    "Right-WM-hypointensities": 79,
    "non-WM-hypointensities": 80,
    "Left-non-WM-hypointensities": 81,
    "Right-non-WM-hypointensities": 82,
    "Optic-Chiasm": 85,
    "CC_Posterior": 251,
    "CC_Mid_Posterior": 252,
    "CC_Central": 253,
    "CC_Mid_Anterior": 254,
    "CC_Anterior": 255,
}

#: Cortical white matter and cortex labels of aseg (not reported in aseg.stats, present in aseg.mgz).
ASEG_TISSUE_LABELS: dict[str, int] = {
    "Left-Cerebral-White-Matter": 2,
    "Left-Cerebral-Cortex": 3,
    "Right-Cerebral-White-Matter": 41,
    "Right-Cerebral-Cortex": 42,
}

#: Desikan-Killiany (``aparc``) regions in colour-table order; ``aparc+aseg`` id = 1000/2000 + index.
#: Index 0 (``unknown``) and 4 (``corpuscallosum``) exist in the colour table but FreeSurfer does not
#: report them in ``?h.aparc.stats``.
DK_CTAB: tuple[str, ...] = (
    "unknown", "bankssts", "caudalanteriorcingulate", "caudalmiddlefrontal", "corpuscallosum",
    "cuneus", "entorhinal", "fusiform", "inferiorparietal", "inferiortemporal", "isthmuscingulate",
    "lateraloccipital", "lateralorbitofrontal", "lingual", "medialorbitofrontal", "middletemporal",
    "parahippocampal", "paracentral", "parsopercularis", "parsorbitalis", "parstriangularis",
    "pericalcarine", "postcentral", "posteriorcingulate", "precentral", "precuneus",
    "rostralanteriorcingulate", "rostralmiddlefrontal", "superiorfrontal", "superiorparietal",
    "superiortemporal", "supramarginal", "frontalpole", "temporalpole", "transversetemporal", "insula",
)

#: The 34 DK regions that ``?h.aparc.stats`` reports, in file order.
DK_REGIONS: tuple[str, ...] = tuple(r for r in DK_CTAB if r not in ("unknown", "corpuscallosum"))

HEMISPHERES: tuple[str, ...] = ("lh", "rh")


def dk_label_id(hemi: str, region: str) -> int:
    """Return the ``aparc+aseg.mgz`` label id of a DK region.

    ``lh`` regions are 1000 + colour-table index, ``rh`` regions 2000 + index.
    """
    if hemi not in HEMISPHERES:
        raise ValueError(f"hemisphere must be 'lh' or 'rh', got {hemi!r}")
    try:
        index = DK_CTAB.index(region)
    except ValueError:
        raise ValueError(
            f"{region!r} is not a Desikan-Killiany region; expected one of {DK_REGIONS}"
        ) from None
    return (1000 if hemi == "lh" else 2000) + index


def aparc_aseg_labels() -> dict[str, int]:
    """All labels of an ``aparc+aseg.mgz``: aseg structures plus ``ctx-lh-<region>``/``ctx-rh-<region>``."""
    labels = dict(ASEG_LABELS)
    labels.update({k: v for k, v in ASEG_TISSUE_LABELS.items() if "White" in k})
    for hemi in HEMISPHERES:
        for region in DK_REGIONS:
            labels[f"ctx-{hemi}-{region}"] = dk_label_id(hemi, region)
    return labels
