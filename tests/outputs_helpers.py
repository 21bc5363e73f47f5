"""Small inputs for the derivatives-writer tests: a tidy score table with a known answer, a tiny FreeSurfer
subject (label volume, surface, annotation) and a stand-in model with closed-form centile curves."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
from scipy.stats import norm

from normdiff_bids.data.atlases import ASEG_LABELS, DK_CTAB, dk_label_id

IDPS = [
    "Left-Hippocampus", "Right-Hippocampus", "Left-Lateral-Ventricle",
    "lh_superiorfrontal_thickness", "rh_superiorfrontal_thickness", "lh_insula_thickness",
    "lh_superiorfrontal_area", "lh_insula_area",
    "lh_superiorfrontal_volume", "EstimatedTotalIntraCranialVol",
]


def tiny_scores(participants=("sub-01", "sub-02", "sub-03"), sessions=("ses-1",), seed=0):
    """A tidy score table as ``NormativeDiffusion.score`` returns it, and the matching covariate table."""
    rng = np.random.default_rng(seed)
    rows, cov = [], []
    for p_i, participant in enumerate(participants):
        for s_i, session in enumerate(sessions):
            z = rng.normal(size=len(IDPS))
            z[0] = 3.1 if p_i == 0 else z[0]         # one strong deviation to flag
            z[3] = -2.2 if p_i == 0 else z[3]        # one moderate deviation
            centile = norm.cdf(z)
            joint = dict(joint_stat=float(rng.gamma(5.0)), joint_centile=float(rng.uniform(0.05, 0.95)))
            joint["joint_z"] = float(norm.ppf(joint["joint_centile"]))
            for idp, zi, ci in zip(IDPS, z, centile, strict=True):
                rows.append(dict(participant_id=participant, session_id=session, idp=idp,
                                 value=float(_mean(idp, 40.0 + 5 * p_i) + _sd(idp) * zi), centile=float(ci),
                                 z=float(zi), tail=int(1 if zi > 3 else 0), extrapolated=p_i == 2, **joint))
            cov.append(dict(participant_id=participant, session_id=session, age=40.0 + 5 * p_i + s_i,
                            sex="F" if p_i % 2 == 0 else "M", site="siteA" if p_i < 2 else "siteB"))
    return pd.DataFrame(rows), pd.DataFrame(cov)


def _mean(idp, age):
    base = {"thickness": 2.6, "area": 2000.0}
    for key, value in base.items():
        if idp.endswith(key):
            return value - 0.004 * (np.asarray(age) - 20) * value / 2.6 * 0.1
    return 4000.0 - 10.0 * (np.asarray(age) - 20)


def _sd(idp):
    return 0.12 if idp.endswith("thickness") else 150.0 if idp.endswith("area") else 350.0


class FakeModel:
    """Stands in for a fitted ``NormativeDiffusion``: Gaussian centiles in closed form."""

    covariates = ("age", "sex", "site")

    def __init__(self, idps=IDPS):
        self.idps_ = list(idps)
        self.covariate_schema_ = SimpleNamespace(
            names=list(self.covariates),
            continuous=[SimpleNamespace(name="age", mean=50.0, sd=15.0, min=20.0, max=80.0)])
        self.calls = []

    def predict_quantiles(self, covariates, q):
        self.calls.append(covariates.copy())
        q = list(q)
        ages = covariates["age"].to_numpy(dtype=float)
        data = {(idp, qq): _mean(idp, ages) + _sd(idp) * norm.ppf(qq) for idp in self.idps_ for qq in q}
        out = pd.DataFrame(data, index=covariates.index)
        out.columns = pd.MultiIndex.from_tuples(out.columns, names=["idp", "q"])
        return out

    def model_card(self):
        return {"backbone": "film-mlp", "idps": self.idps_, "n_train": 123,
                "covariates": {"age": {"min": 20.0, "max": 80.0}, "sex": {"levels": ["F", "M"]}},
                "training_summary": {"epochs": 10, "best_val_loss": 0.91}, "version": "test"}


#: Boxes of the tiny label volume: label id -> (x, y, z) slices.
def _boxes():
    ctx = {dk_label_id("lh", "superiorfrontal"): (slice(4, 10), slice(4, 12), slice(10, 20)),
           dk_label_id("lh", "insula"): (slice(10, 14), slice(4, 12), slice(10, 20)),
           dk_label_id("rh", "superiorfrontal"): (slice(18, 24), slice(4, 12), slice(10, 20)),
           dk_label_id("lh", "precuneus"): (slice(4, 10), slice(20, 26), slice(10, 20))}  # not scored
    aseg = {ASEG_LABELS["Left-Hippocampus"]: (slice(8, 12), slice(14, 18), slice(12, 16)),
            ASEG_LABELS["Right-Hippocampus"]: (slice(18, 22), slice(14, 18), slice(12, 16)),
            ASEG_LABELS["Left-Lateral-Ventricle"]: (slice(12, 15), slice(14, 20), slice(16, 20)),
            ASEG_LABELS["Left-Thalamus"]: (slice(14, 17), slice(20, 24), slice(12, 16))}  # not scored
    return {**ctx, **aseg}


#: FreeSurfer's conformed orientation (LIA), 2 mm voxels, shifted centre: a realistic, non-trivial affine.
AFFINE = np.array([[-2.0, 0, 0, 33.0], [0, 0, 2.0, -28.0], [0, -2.0, 0, 31.0], [0, 0, 0, 1]])
#: Centre of the surface RAS in scanner RAS (``c_ras``): the shift of FreeSurfer surfaces.
C_RAS = np.array([1.0, 4.0, -3.0])


def write_tiny_freesurfer_subject(subject_dir: Path, *, with_surfaces: bool = True) -> dict[str, Path]:
    """A 32^3 ``mri/aparc+aseg.mgz`` with white matter and a few scored and unscored structures, and (if
    asked) ``surf/?h.white`` + ``label/?h.aparc.annot`` on a small mesh with DK region names."""
    mri = subject_dir / "mri"
    mri.mkdir(parents=True, exist_ok=True)
    labels = np.zeros((32, 32, 32), dtype=np.int32)
    labels[3:27, 3:29, 8:24] = 2  # Left-Cerebral-White-Matter: brain but unscored
    for label, box in _boxes().items():
        labels[box] = label
    mgh = nib.MGHImage(labels, AFFINE)
    nib.save(mgh, mri / "aparc+aseg.mgz")
    paths = {"aparc_aseg": mri / "aparc+aseg.mgz"}
    if not with_surfaces:
        return paths
    (subject_dir / "surf").mkdir(exist_ok=True)
    (subject_dir / "label").mkdir(exist_ok=True)
    coords, faces = _grid_mesh(6)
    names = [n.encode() for n in DK_CTAB]
    ctab = np.zeros((len(names), 5), dtype=np.int32)
    ctab[:, :3] = np.arange(len(names))[:, None] * [7, 13, 29] % 256
    for hemi in ("lh", "rh"):
        volume_info = {"head": np.array([2, 0, 20], dtype=np.int32), "valid": "1  # volume info valid",
                       "filename": "orig.mgz", "volume": np.array([32, 32, 32]),
                       "voxelsize": np.array([2.0] * 3), "xras": np.array([-1.0, 0, 0]),
                       "yras": np.array([0, 0, -1.0]), "zras": np.array([0, 1.0, 0]), "cras": C_RAS}
        nib.freesurfer.write_geometry(subject_dir / "surf" / f"{hemi}.white", coords, faces,
                                      volume_info=volume_info)
        nib.freesurfer.write_annot(subject_dir / "label" / f"{hemi}.aparc.annot", annot_labels(len(coords)),
                                   ctab, names, fill_ctab=True)
        paths[f"{hemi}_white"] = subject_dir / "surf" / f"{hemi}.white"
        paths[f"{hemi}_annot"] = subject_dir / "label" / f"{hemi}.aparc.annot"
    return paths


def annot_labels(n_vertices: int) -> np.ndarray:
    """Colour-table index per vertex: thirds superiorfrontal / insula / precuneus, two unlabelled (-1)."""
    labels = np.empty(n_vertices, dtype=np.int32)
    third = n_vertices // 3
    labels[:third] = DK_CTAB.index("superiorfrontal")
    labels[third:2 * third] = DK_CTAB.index("insula")
    labels[2 * third:] = DK_CTAB.index("precuneus")
    labels[-2:] = -1
    return labels


def _grid_mesh(n: int):
    xs, ys = np.meshgrid(np.arange(n, dtype=float), np.arange(n, dtype=float), indexing="ij")
    coords = np.column_stack([xs.ravel(), ys.ravel(), np.zeros(n * n)])
    faces = []
    for i in range(n - 1):
        for j in range(n - 1):
            a, b, c, d = i * n + j, (i + 1) * n + j, i * n + j + 1, (i + 1) * n + j + 1
            faces += [(a, b, c), (b, d, c)]
    return coords, np.array(faces, dtype=np.int32)


def write_worker(output_dir, bids_dir, prefix, barrier, rounds=8):
    """One participant-level job: prepare the shared folder, then write one new subject per round (its
    deviation tables, and its rows added to the shared group tables). Every round adds rows, so an update
    lost to a race between two jobs stays lost (used with multiprocessing)."""
    from normdiff_bids.outputs.dataset import prepare_output_dir
    from normdiff_bids.outputs.tables import scores_to_wide, write_group_table, write_subject_scores

    barrier.wait(timeout=60)
    for r in range(rounds):
        prepare_output_dir(output_dir, bids_dir)
        tidy, cov = tiny_scores(participants=(f"sub-{prefix}{r:02d}",), sessions=("ses-1", "ses-2"), seed=r)
        write_subject_scores(output_dir, tidy)
        write_group_table(output_dir, scores_to_wide(tidy, cov))
