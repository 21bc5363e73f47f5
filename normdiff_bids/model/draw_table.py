"""The draw table: the model's draws at every point of its scoring grid, kept in the bundle, so that
scoring, centile curves and reports from a saved model need no network evaluation.

A grid point's draws depend only on the weights, the seed, the sampling settings and the point (one
seeded stream per point, see :mod:`~normdiff_bids.model.sampling`), so the table holds exactly the draws
sampling would produce on the machine that fitted the model: scoring from it is the sampling path, with
the network evaluations done in advance. It also makes scores identical on every machine that loads the
bundle, whatever its device. Points outside the table (ages beyond the training range, rows scored with
other settings, ``covariate_grid="off"``) are drawn as before.

The table covers the training range of the continuous covariate, one grid step beyond each end, for every
level combination of the network's categorical covariates (and the unknown level where it is trained).
It is not built when it would exceed :data:`MAX_TABLE_BYTES` (many categorical levels, large D).

``fit`` only plans the table: scoring the fitted model draws the points it needs and keeps them in the
table, and saving the model draws the rest, so that fitting and scoring in one process evaluate the
network at the points they use only, while every bundle holds the whole table.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from normdiff_bids.model.sampling import Drawer, Grid, point_key

__all__ = ["MAX_TABLE_BYTES", "TENSOR_PREFIX", "DrawTable", "grid_points"]

#: Largest table built (float32 draws): 512 MiB, e.g. D = 200 at 1000 draws over 640 grid points.
MAX_TABLE_BYTES = 512 * 2**20
#: Key prefix of the table's tensors in the bundle's safetensors file.
TENSOR_PREFIX = "draws."


def grid_points(grid: Grid, low: float, high: float, levels: list[list[int]]):
    """Every grid point from ``low`` to ``high`` (original units, one step beyond each end) for every
    level combination: ``(points_cont [P, 1] float32, points_cat [P, n_cat] int64)``, encoded exactly as
    :func:`~normdiff_bids.model.sampling.plan_points` encodes a row's grid points."""
    ks = np.arange(int(np.floor(low / grid.step)) - 1, int(np.ceil(high / grid.step)) + 2, dtype=np.int64)
    combos = list(itertools.product(*levels)) if levels else [()]
    cat = np.array([c for c in combos for _ in ks], dtype=np.int64).reshape(len(combos) * len(ks),
                                                                              len(levels))
    k = np.tile(ks, len(combos))
    cont = ((k * grid.step - grid.mean) / grid.sd).astype(np.float32)[:, None]
    return cont, cat


@dataclass
class DrawTable:
    """Draws ``samples [P, S, D]`` (float32, model space) at ``points_cont``/``points_cat``, made with
    ``settings`` (the drawer's :meth:`~normdiff_bids.model.sampling.Drawer.table_settings`); ``drawn [P]``
    says which points hold their draws yet (a table loaded from a bundle is complete)."""

    settings: dict
    points_cont: np.ndarray
    points_cat: np.ndarray
    samples: np.ndarray
    drawn: np.ndarray | None = None
    _index: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.drawn is None:
            self.drawn = np.ones(len(self.points_cont), dtype=bool)
        self._index = {point_key(c, k): i for i, (c, k) in enumerate(zip(self.points_cont, self.points_cat))}

    def __len__(self) -> int:
        return len(self.points_cont)

    @property
    def nbytes(self) -> int:
        """The size of the complete table's draws."""
        return int(self.samples.nbytes)

    @property
    def is_complete(self) -> bool:
        return bool(self.drawn.all())

    def serves(self, settings: dict) -> bool:
        """Whether a drawer with ``settings`` would produce these draws (same weights, seed, settings)."""
        return settings == self.settings

    def find(self, cont_row, cat_row) -> np.ndarray | None:
        """The draws ``[S, D]`` of one point, or ``None`` when the table does not hold them (yet)."""
        i = self._index.get(point_key(cont_row, cat_row))
        return None if i is None or not self.drawn[i] else self.samples[i]

    def keep(self, cont_row, cat_row, samples: np.ndarray) -> None:
        """Store the draws ``[S, D]`` of one point, if it is one of the table's and not drawn yet."""
        i = self._index.get(point_key(cont_row, cat_row))
        if i is not None and not self.drawn[i]:
            self.samples[i] = samples
            self.drawn[i] = True

    @classmethod
    def planned(cls, settings: dict, points_cont: np.ndarray, points_cat: np.ndarray,
                n_features: int) -> DrawTable:
        """A table of these points with none drawn yet (``settings["n_samples"]`` draws per point)."""
        samples = np.empty((len(points_cont), int(settings["n_samples"]), n_features), dtype=np.float32)
        return cls(dict(settings), points_cont, points_cat, samples, np.zeros(len(points_cont), dtype=bool))

    def complete(self, drawer: Drawer) -> DrawTable:
        """Draw the points not drawn yet with ``drawer`` (one without a table, with these settings);
        points this process has drawn before come from its draw cache. Returns ``self``."""
        if not self.serves(drawer.table_settings(self.samples.shape[1])):
            raise ValueError("the drawer's weights or sampling settings are not the draw table's")
        todo = np.flatnonzero(~self.drawn)
        if len(todo):
            for first, drawn in drawer.draw(self.points_cont[todo], self.points_cat[todo],
                                            self.samples.shape[1], desc="draw table"):
                self.samples[todo[first:first + len(drawn)]] = drawn
            self.drawn[todo] = True
        return self

    # -- persistence: tensors in the bundle's safetensors file, settings in model.json -----------------
    def to_tensors(self) -> dict[str, np.ndarray]:
        if not self.is_complete:
            raise ValueError(f"the draw table holds {int(self.drawn.sum())} of its {len(self)} points; "
                             f"complete it before writing it")
        names = ("points_cont", "points_cat", "samples")
        return {f"{TENSOR_PREFIX}{name}": np.ascontiguousarray(getattr(self, name)) for name in names}

    @classmethod
    def from_tensors(cls, settings: dict, tensors: dict[str, np.ndarray]) -> DrawTable:
        get = {name: np.asarray(tensors[f"{TENSOR_PREFIX}{name}"]) for name in ("points_cont", "points_cat",
                                                                                 "samples")}
        if get["samples"].ndim != 3 or len(get["samples"]) != len(get["points_cont"]) \
                or len(get["points_cat"]) != len(get["points_cont"]):
            raise ValueError(f"draw table tensors have inconsistent shapes: "
                             f"{ {k: tuple(v.shape) for k, v in get.items()} }")
        for array in get.values():
            array.setflags(write=False)  # shared with the process's cache of verified bundles
        return cls(dict(settings), get["points_cont"], get["points_cat"], get["samples"])
