"""Images and surfaces of a synthetic subject: aparc+aseg label volume, white surfaces, DK annotation, T1w."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from normdiff_bids.data.atlases import DK_CTAB, DK_REGIONS, DK_RGB, aparc_aseg_labels

#: The label volume: a 32^3 grid of 6 mm voxels (small files; every label still owns a blob).
_MGZ_SHAPE = 32
_MGZ_VOXEL_MM = 6.0


def write_aparc_aseg(path: Path, rng: np.random.Generator) -> None:
    """A small ``aparc+aseg.mgz``: every label of :func:`aparc_aseg_labels` present as a compact blob.

    An ellipsoidal brain: a cortical ribbon (DK labels, split by hemisphere), white matter beneath it,
    and a core of aseg structures (left ones on the left, right ones on the right, midline ones between).
    Inside each zone voxels go to the nearest of that zone's label seeds, so every label owns its seed.
    """
    n = _MGZ_SHAPE
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=float),) * 3, indexing="ij"), axis=-1)
    centre, radii = (n - 1) / 2.0, np.array([13.0, 15.0, 12.0])
    # Voxel axes follow FreeSurfer's conformed LIA orientation: axis 0 runs right-to-left.
    rel = (grid - centre) / radii
    r = np.sqrt((rel**2).sum(-1))
    left = grid[..., 0] > centre  # LIA: larger first index is further left
    x_mm = np.abs(grid[..., 0] - centre)
    labels = aparc_aseg_labels()
    zones = {
        "ctx-lh": (r < 1.0) & (r >= 0.78) & left,
        "ctx-rh": (r < 1.0) & (r >= 0.78) & ~left,
        "wm-lh": (r < 0.78) & (r >= 0.6) & left,
        "wm-rh": (r < 0.78) & (r >= 0.6) & ~left,
        "mid": (r < 0.6) & (x_mm < 1.6),
        "core-lh": (r < 0.6) & (x_mm >= 1.6) & left,
        "core-rh": (r < 0.6) & (x_mm >= 1.6) & ~left,
    }
    members: dict[str, list[int]] = {z: [] for z in zones}
    for name, label_id in labels.items():
        if name.startswith("ctx-lh-"):
            members["ctx-lh"].append(label_id)
        elif name.startswith("ctx-rh-"):
            members["ctx-rh"].append(label_id)
        elif name == "Left-Cerebral-White-Matter":
            members["wm-lh"].append(label_id)
        elif name == "Right-Cerebral-White-Matter":
            members["wm-rh"].append(label_id)
        elif name.startswith("Left-"):
            members["core-lh"].append(label_id)
        elif name.startswith("Right-"):
            members["core-rh"].append(label_id)
        else:
            members["mid"].append(label_id)
    volume = np.zeros((n, n, n), dtype=np.int32)
    for zone, mask in zones.items():
        ids = np.array(members[zone], dtype=np.int32)
        where = np.argwhere(mask)
        seeds = where[rng.choice(len(where), size=len(ids), replace=False)].astype(float)
        dist = ((where[:, None, :] - seeds[None, :, :]) ** 2).sum(-1)
        volume[tuple(where.T)] = ids[np.argmin(dist, axis=1)]
    s = _MGZ_VOXEL_MM
    half = s * n / 2.0
    affine = np.array([[-s, 0.0, 0.0, half], [0.0, 0.0, s, -half], [0.0, -s, 0.0, half],
                       [0.0, 0.0, 0.0, 1.0]])
    img = nib.MGHImage(volume, affine)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def icosphere(subdivisions: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit icosphere (vertices [V, 3], faces [F, 3], outward-facing): 642 vertices at 3 subdivisions."""
    t = (1.0 + np.sqrt(5.0)) / 2.0
    verts = [(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t), (0, -1, -t), (0, 1, -t),
             (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)]
    faces = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2),
             (10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5),
             (2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1)]
    vertices = [np.array(v, dtype=float) / np.linalg.norm(v) for v in verts]

    def midpoint(a: int, b: int, cache: dict[tuple[int, int], int]) -> int:
        key = (min(a, b), max(a, b))
        if key not in cache:
            mid = vertices[a] + vertices[b]
            vertices.append(mid / np.linalg.norm(mid))
            cache[key] = len(vertices) - 1
        return cache[key]

    for _ in range(subdivisions):
        cache: dict[tuple[int, int], int] = {}
        new_faces = []
        for a, b, c in faces:
            ab, bc, ca = midpoint(a, b, cache), midpoint(b, c, cache), midpoint(c, a, cache)
            new_faces += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
        faces = new_faces
    return np.array(vertices), np.array(faces, dtype=np.int32)


def write_annot(path: Path, unit_vertices: np.ndarray, rng: np.random.Generator) -> None:
    """``?h.aparc.annot`` with the DK colour table; each of the 34 regions owns a patch of vertices."""
    region_index = np.array([DK_CTAB.index(r) for r in DK_REGIONS])
    seeds = unit_vertices[rng.choice(len(unit_vertices), size=len(DK_REGIONS), replace=False)]
    nearest = np.argmax(unit_vertices @ seeds.T, axis=1)
    vertex_labels = region_index[nearest].astype(np.int32)
    ctab = np.array([[*DK_RGB[name], 0, 0] for name in DK_CTAB], dtype=np.int32)
    ctab[:, 4] = ctab[:, 0] + ctab[:, 1] * 256 + ctab[:, 2] * 65536
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.freesurfer.write_annot(str(path), vertex_labels, ctab, list(DK_CTAB), fill_ctab=False)


def write_white_surface(path: Path, unit_vertices: np.ndarray, faces: np.ndarray, hemi: str,
                        label: str) -> None:
    """``?h.white``: the unit icosphere stretched into a hemisphere-sized ellipsoid on its side."""
    side = -1.0 if hemi == "lh" else 1.0
    coords = unit_vertices * np.array([32.0, 68.0, 55.0]) + np.array([side * 36.0, -15.0, 10.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.freesurfer.write_geometry(str(path), coords.astype(np.float32), faces.astype(np.int32),
                                  create_stamp=f"created by normdiff-synth for {label}")


def write_t1w(path: Path) -> None:
    """A tiny placeholder T1w NIfTI (a bright ball in an 8^3 grid of 24 mm voxels), not a brain image."""
    data = np.zeros((8, 8, 8), dtype=np.int16)
    x, y, zz = np.mgrid[:8, :8, :8] - 3.5
    data[x**2 + y**2 + zz**2 < 12] = 100
    affine = np.diag([24.0, 24.0, 24.0, 1.0])
    affine[:3, 3] = -84.0
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
