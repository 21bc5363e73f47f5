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


#: Desikan-Killiany-Tourville (``aparc.DKTatlas``) regions reported in ``?h.aparc.DKTatlas.stats``: the DK
#: regions less banks of the STS, frontal pole and temporal pole.
DKT_REGIONS: tuple[str, ...] = tuple(
    r for r in DK_REGIONS if r not in ("bankssts", "frontalpole", "temporalpole")
)

#: Destrieux (``aparc.a2009s``) regions in ``?h.aparc.a2009s.stats`` order, FreeSurfer 7 spelling
#: (FreeSurfer <= 6 writes ``&`` for ``_and_``; see ``FS6_TO_FS7``). ``aparc.a2009s+aseg`` ids are
#: 11100/12100 + (index + 1).
DESTRIEUX_REGIONS: tuple[str, ...] = (
    "G_and_S_frontomargin", "G_and_S_occipital_inf", "G_and_S_paracentral", "G_and_S_subcentral",
    "G_and_S_transv_frontopol", "G_and_S_cingul-Ant", "G_and_S_cingul-Mid-Ant", "G_and_S_cingul-Mid-Post",
    "G_cingul-Post-dorsal", "G_cingul-Post-ventral", "G_cuneus", "G_front_inf-Opercular",
    "G_front_inf-Orbital", "G_front_inf-Triangul", "G_front_middle", "G_front_sup", "G_Ins_lg_and_S_cent_ins",
    "G_insular_short", "G_occipital_middle", "G_occipital_sup", "G_oc-temp_lat-fusifor",
    "G_oc-temp_med-Lingual", "G_oc-temp_med-Parahip", "G_orbital", "G_pariet_inf-Angular",
    "G_pariet_inf-Supramar", "G_parietal_sup", "G_postcentral", "G_precentral", "G_precuneus", "G_rectus",
    "G_subcallosal", "G_temp_sup-G_T_transv", "G_temp_sup-Lateral", "G_temp_sup-Plan_polar",
    "G_temp_sup-Plan_tempo", "G_temporal_inf", "G_temporal_middle", "Lat_Fis-ant-Horizont",
    "Lat_Fis-ant-Vertical", "Lat_Fis-post", "Pole_occipital", "Pole_temporal", "S_calcarine", "S_central",
    "S_cingul-Marginalis", "S_circular_insula_ant", "S_circular_insula_inf", "S_circular_insula_sup",
    "S_collat_transv_ant", "S_collat_transv_post", "S_front_inf", "S_front_middle", "S_front_sup",
    "S_interm_prim-Jensen", "S_intrapariet_and_P_trans", "S_oc_middle_and_Lunatus",
    "S_oc_sup_and_transversal", "S_occipital_ant", "S_oc-temp_lat", "S_oc-temp_med_and_Lingual",
    "S_orbital_lateral", "S_orbital_med-olfact", "S_orbital-H_Shaped", "S_parieto_occipital",
    "S_pericallosal", "S_postcentral", "S_precentral-inf-part", "S_precentral-sup-part", "S_suborbital",
    "S_subparietal", "S_temporal_inf", "S_temporal_sup", "S_temporal_transverse",
)

#: Brodmann-area labels of ``?h.BA_exvivo.stats`` (FreeSurfer >= 6).
BA_EXVIVO_REGIONS: tuple[str, ...] = (
    "BA1_exvivo", "BA2_exvivo", "BA3a_exvivo", "BA3b_exvivo", "BA4a_exvivo", "BA4p_exvivo", "BA6_exvivo",
    "BA44_exvivo", "BA45_exvivo", "V1_exvivo", "V2_exvivo", "MT_exvivo", "perirhinal_exvivo",
    "entorhinal_exvivo",
)

#: Colours of the DK colour table (``aparc.annot.ctab``, ``FreeSurferColorLUT.txt`` 1000-1035), by region.
DK_RGB: dict[str, tuple[int, int, int]] = {
    "unknown": (25, 5, 25), "bankssts": (25, 100, 40), "caudalanteriorcingulate": (125, 100, 160),
    "caudalmiddlefrontal": (100, 25, 0), "corpuscallosum": (120, 70, 50), "cuneus": (220, 20, 100),
    "entorhinal": (220, 20, 10), "fusiform": (180, 220, 140), "inferiorparietal": (220, 60, 220),
    "inferiortemporal": (180, 40, 120), "isthmuscingulate": (140, 20, 140), "lateraloccipital": (20, 30, 140),
    "lateralorbitofrontal": (35, 75, 50), "lingual": (225, 140, 140), "medialorbitofrontal": (200, 35, 75),
    "middletemporal": (160, 100, 50), "parahippocampal": (20, 220, 60), "paracentral": (60, 220, 60),
    "parsopercularis": (220, 180, 140), "parsorbitalis": (20, 100, 50), "parstriangularis": (220, 60, 20),
    "pericalcarine": (120, 100, 60), "postcentral": (220, 20, 20), "posteriorcingulate": (220, 180, 220),
    "precentral": (60, 20, 220), "precuneus": (160, 140, 180), "rostralanteriorcingulate": (80, 20, 140),
    "rostralmiddlefrontal": (75, 50, 125), "superiorfrontal": (20, 220, 160),
    "superiorparietal": (20, 180, 140),
    "superiortemporal": (140, 220, 220), "supramarginal": (80, 160, 20), "frontalpole": (100, 0, 100),
    "temporalpole": (70, 70, 70), "transversetemporal": (150, 150, 200), "insula": (255, 192, 32),
}
