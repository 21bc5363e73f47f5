"""Where and how scoring draws from a fitted model: the covariate-point plan (exact points or the age
grid), one seeded noise stream per point, the process-wide draw cache, and the scored points (each row's
sorted samples and joint reference).

Every draw comes from a random stream derived from the seed and the covariates it is drawn at, never from
the batch, so a participant scored alone gets exactly the scores it gets inside its cohort.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from normdiff_bids.model.ensemble import members, sample_blocks
from normdiff_bids.progress import progress
from normdiff_bids.scoring.centiles import interpolate_quantile_functions
from normdiff_bids.scoring.conditional import PointDraws

__all__ = ["GRID_STEP_FRACTION", "NOISE_BYTES_PER_CALL", "ROWS_PER_CALL", "ROW_CHUNK_ELEMENTS", "Drawer",
           "Grid", "plan_points", "point_key", "point_seed", "scored_points", "small_blas"]

#: Target rows (samples) per network call when sampling, and the memory budget for its noise.
ROWS_PER_CALL = 4096
NOISE_BYTES_PER_CALL = 256 * 2**20
#: Elements of a [rows, S, D] float64 block when scoring rows (about 64 MB).
ROW_CHUNK_ELEMENTS = 8_000_000
#: Default covariate-grid step as a fraction of the continuous covariate's training SD (see
#: :class:`~normdiff_bids.model.estimator.NormativeDiffusion`, ``covariate_grid``).
GRID_STEP_FRACTION = 1 / 10


@dataclass(frozen=True)
class Grid:
    """The scoring grid of the one continuous covariate: its training ``mean`` and ``sd``, and ``step``
    in its units."""

    mean: float
    sd: float
    step: float


def plan_points(cont: np.ndarray, cat: np.ndarray, rows: np.ndarray, grid: Grid | None):
    """Covariate points to draw at, and each row's two points and interpolation weight.

    Returns ``(points_cont [P, n_cont], points_cat [P, n_cat], lo [r], hi [r], w_hi [r])`` for the
    rows ``rows``; points are sorted (categorical levels, then the continuous covariate), so a
    row's ``lo`` and ``hi`` are neighbours in that order. ``grid=None``: one point per distinct row.
    """
    cont, cat = cont[rows], cat[rows]
    if grid is None:
        key = np.concatenate([cat.astype(np.float64), cont.astype(np.float64)], axis=1)
        uniq, inverse = np.unique(key, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        n_cat = cat.shape[1]
        return (uniq[:, n_cat:].astype(np.float32), uniq[:, :n_cat].astype(np.int64),
                inverse, inverse, np.zeros(len(rows)))
    step = grid.step
    value = grid.mean + cont[:, 0].astype(np.float64) * grid.sd
    position = value / step
    # ages on a grid point (curve ages, or the same age decoded from float32) land on it exactly
    snapped = np.abs(position - np.round(position)) < 1e-4
    position = np.where(snapped, np.round(position), position)
    k = np.floor(position).astype(np.int64)
    w = position - k
    k_hi = np.where(w > 0, k + 1, k)
    keys = np.concatenate([np.column_stack([cat, k]), np.column_stack([cat, k_hi])])
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    lo, hi = inverse[: len(rows)], inverse[len(rows):]
    points_cont = ((uniq[:, -1] * step - grid.mean) / grid.sd).astype(np.float32)[:, None]
    return points_cont, uniq[:, :-1].astype(np.int64), lo, hi, w


def point_key(cont_row: np.ndarray, cat_row: np.ndarray) -> tuple[bytes, bytes]:
    """The identity of one covariate point as encoded (float32 continuous, int64 categorical), the key
    its draws are kept under (draw cache, draw table)."""
    return (np.ascontiguousarray(cont_row, dtype=np.float32).tobytes(),
            np.ascontiguousarray(cat_row, dtype=np.int64).tobytes())


def point_seed(seed: int, cont_row: np.ndarray, cat_row: np.ndarray) -> int:
    """Random stream of one covariate point: a hash of the seed and the point's encoded covariates."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.int64(seed).tobytes())
    h.update(np.ascontiguousarray(cont_row, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(cat_row, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


class _DrawCache:
    """Draws of covariate points kept for reuse within one process, bounded in bytes (oldest dropped)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: dict[tuple, np.ndarray] = {}
        self._bytes = 0

    def __contains__(self, key) -> bool:
        return key in self._items

    def __getitem__(self, key) -> np.ndarray:
        return self._items[key]

    def put(self, key, samples: np.ndarray) -> None:
        if key in self._items or samples.nbytes > self.max_bytes:
            return
        self._items[key] = samples
        self._bytes += samples.nbytes
        while self._bytes > self.max_bytes:
            oldest = next(iter(self._items))
            self._bytes -= self._items.pop(oldest).nbytes

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0


#: Process-wide reuse of drawn covariate points (see :meth:`Drawer.draw`); 256 MB at most.
_POINT_CACHE = _DrawCache(256 * 2**20)


@dataclass(frozen=True)
class Drawer:
    """Draws from a fitted encoder + network at covariate points, in model space.

    ``modules()`` returns ``(encoder, network, diffusion)``; it is called only when a point has to be
    drawn, so scoring from a draw table builds no network (and imports no torch). ``weights_token``
    identifies the weights (the cache key of their draws); ``n_features`` is D.
    ``standardise``: each point's draws are centred and scaled to SD 1 per IDP (the two-stage model,
    whose location-scale stage owns the first two moments, so the network supplies only the shape and
    the dependence; the error of a network's spread at small N does not reach the centiles).
    """

    modules: Callable[[], tuple]
    seed: int
    sampler: str
    steps: int
    n_features: int
    weights_token: str
    verbose: bool = False
    standardise: bool = False
    #: A :class:`~normdiff_bids.model.draw_table.DrawTable` whose points are taken from it instead of being
    #: drawn, and which keeps those of its points that are drawn (when it was made with this drawer's
    #: settings).
    table: object | None = None

    def table_settings(self, n_samples: int) -> dict:
        """What a point's draws depend on besides the point (the device aside): a draw table made with
        these settings holds exactly what this drawer would draw."""
        return {"weights": self.weights_token, "seed": int(self.seed), "n_samples": int(n_samples),
                "sampler": self.sampler, "steps": int(self.steps), "standardise": bool(self.standardise)}

    def draw(self, points_cont, points_cat, n_samples, desc) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first point, samples [p, S, D] float32 in model space)`` for consecutive points.

        Every network call has the same shape (a call is padded by repeating its final point), so a
        point's samples are bit-identical whichever points it is drawn with. That also makes them safe
        to reuse: points drawn before by this process with the same weights and sampling settings come
        from :data:`_POINT_CACHE` (a participant report's centile curves share their points with every
        other participant of the same sex and site), and points the drawer's draw table holds come from
        it (no network evaluation at all). Points of the table that it does not hold yet are kept in it
        once drawn. A call that the points due next leave part empty also draws the points to draw
        after them (kept until their turn), so that only the final call is padded.
        """
        n_points = len(points_cont)
        table = self.table if self.table is not None and self.table.serves(self.table_settings(n_samples)) \
            else None
        tabled = [None if table is None else table.find(points_cont[i], points_cat[i])
                  for i in range(n_points)]
        keys, to_draw, modules = [None] * n_points, [], None
        per_call = max(1, ROWS_PER_CALL // n_samples)  # only the chunks of the yield when nothing is drawn
        if any(t is None for t in tabled):
            modules = encoder, network, diffusion = self.modules()
            encoder.eval()
            network.eval()
            device = next(network.parameters()).device
            n_draws = diffusion.noise_draws(self.sampler, self.steps)
            rows_per_call = min(ROWS_PER_CALL, NOISE_BYTES_PER_CALL // (4 * n_draws * self.n_features))
            per_call = max(1, rows_per_call // n_samples)
            settings = (self.weights_token, int(self.seed), n_samples, self.sampler, self.steps, str(device),
                        self.standardise)
            keys = [settings + point_key(points_cont[i], points_cat[i]) for i in range(n_points)]
            to_draw = [i for i in range(n_points) if tabled[i] is None and keys[i] not in _POINT_CACHE]
        d = self.n_features
        ahead = 0  # to_draw[ahead:] are neither drawn nor due yet
        drawn_ahead: dict[int, np.ndarray] = {}
        # a progress bar only for what is drawn: points from the table or the cache cost nothing
        bar = progress(total=n_points, desc=desc, verbose=self.verbose and len(to_draw) > 0, unit="point")
        try:
            for first in range(0, n_points, per_call):
                idx = np.arange(first, min(first + per_call, n_points))
                out = np.empty((len(idx), n_samples, d), dtype=np.float32)
                todo = []
                for j, i in enumerate(idx):
                    if tabled[i] is not None:
                        out[j] = tabled[i]
                        continue
                    if i in drawn_ahead:
                        out[j] = drawn_ahead.pop(i)
                    elif keys[i] in _POINT_CACHE:
                        out[j] = _POINT_CACHE[keys[i]]
                    else:
                        todo.append(j)
                        continue
                    if table is not None:
                        table.keep(points_cont[i], points_cat[i], out[j])
                if todo:
                    while ahead < len(to_draw) and to_draw[ahead] <= idx[-1]:
                        ahead += 1
                    later = to_draw[ahead:ahead + per_call - len(todo)]
                    ahead += len(later)
                    call = np.concatenate([idx[todo], np.asarray(later, dtype=idx.dtype)])
                    drawn = self._call(modules, points_cont, points_cat, call, per_call, n_samples, n_draws,
                                       device)
                    for i, smp in zip(call, drawn):
                        _POINT_CACHE.put(keys[i], smp)
                        if table is not None:
                            table.keep(points_cont[i], points_cat[i], smp)
                    out[todo] = drawn[:len(todo)]
                    drawn_ahead.update(zip(later, drawn[len(todo):]))
                bar.update(len(idx))
                yield first, out
        finally:
            bar.close()

    def _call(self, modules, points_cont, points_cat, points: np.ndarray, per_call: int, n_samples: int,
              n_draws: int, device) -> np.ndarray:
        """One network call: the samples ``[len(points), S, D]`` (float32) of ``points`` (at most
        ``per_call``), the call padded to ``per_call`` points by repeating the final one."""
        import torch

        encoder, network, diffusion = modules
        d = self.n_features
        padded = np.concatenate([points, np.full(per_call - len(points), points[-1])])
        noise = torch.stack([
            torch.randn((n_draws, n_samples, d),
                        generator=torch.Generator().manual_seed(point_seed(self.seed, points_cont[i],
                                                                           points_cat[i])))
            for i in padded], dim=1).to(device)
        cont = torch.from_numpy(points_cont[padded]).to(device)
        cat = torch.from_numpy(points_cat[padded]).to(device)
        pairs = members(encoder, network)
        drawn = np.empty((len(points), n_samples, d), dtype=np.float32)
        # each network draws its block of every point's draws, from that block of the same noise (with
        # fewer draws than networks, some blocks are empty and their networks draw nothing)
        drawing = [(pair, block) for pair, block in zip(pairs, sample_blocks(n_samples, len(pairs)))
                   if block.stop > block.start]
        for (member_encoder, member_network), block in drawing:
            with torch.no_grad():
                x0 = diffusion.sample(member_network, member_encoder(cont, cat),
                                      noise[:, :, block].contiguous(), sampler=self.sampler, steps=self.steps)
            drawn[:, block] = x0[: len(points)].float().cpu().numpy()
        if not np.isfinite(drawn).all():
            raise RuntimeError("the model produced non-finite samples; the fit diverged or the "
                               "sampler is unstable for this diffusion setting")
        if self.standardise:  # each network's block on its own, so the pool is standardised too
            for _, block in drawing:
                part = drawn[:, block]
                sd = part.std(axis=1, keepdims=True, dtype=np.float64)
                drawn[:, block] = ((part - part.mean(axis=1, keepdims=True, dtype=np.float64))
                                   / np.maximum(sd, 1e-12)).astype(np.float32)
        return drawn


def scored_points(drawer: Drawer, grid: Grid | None, cont, cat, missing, n_samples: int, with_joint: bool,
                  joint_shrinkage: float = 0.0):
    """Iterate over the rows without missing covariates, in chunks that share covariate points.

    Yields ``(rows, q [r, S, D] per-IDP sorted samples in model space, point draws or None)``.
    A row's sorted samples are its own point's (exact) or the interpolation of its two grid points'
    quantile functions; its :class:`~normdiff_bids.scoring.conditional.PointDraws` (the joint deviation
    and conditional centiles score against them, with ``joint_shrinkage``) are those of the nearer point.
    """
    rows = np.flatnonzero(~missing)
    if not len(rows):
        return
    points_cont, points_cat, lo, hi, w = plan_points(cont, cat, rows, grid)
    last = np.maximum(lo, hi)
    order = np.argsort(last, kind="stable")
    cache: dict[int, tuple] = {}
    cursor = 0
    for first, samples in drawer.draw(points_cont, points_cat, n_samples, desc="sampling"):
        for j, smp in enumerate(samples):
            srt = np.sort(smp, axis=0).astype(np.float64)
            cache[first + j] = (srt, PointDraws(smp, joint_shrinkage) if with_joint else None)
        done = first + len(samples)
        end = cursor + np.searchsorted(last[order[cursor:]], done, side="left")
        take = order[cursor:end]
        cursor = end
        per_chunk = max(1, ROW_CHUNK_ELEMENTS // (n_samples * drawer.n_features))
        for chunk in np.array_split(take, max(1, math.ceil(len(take) / per_chunk))):
            if not len(chunk):
                continue
            q = np.stack([cache[i][0] for i in lo[chunk]])
            if grid is not None:
                # both arguments are sorted already, so this is the rank-by-rank mix w Q_hi + (1 - w) Q_lo
                q = interpolate_quantile_functions(np.stack([cache[i][0] for i in hi[chunk]]), q, w[chunk])
            nearer = np.where(w[chunk] > 0.5, hi[chunk], lo[chunk])
            ref = [cache[i][1] for i in nearer] if with_joint else None
            yield rows[chunk], q, ref
        keep = min(lo[order[cursor:]].min(), done) if cursor < len(order) else done
        for i in [i for i in cache if i < keep]:
            del cache[i]


def small_blas():
    """Run numpy/scipy BLAS single-threaded: scoring does many small (D x D) factorisations, for which
    BLAS threads only add synchronisation (on a busy 2-core machine a 200 x 200 Cholesky went from
    0.3 ms to over 100 ms with two threads). The network's own threads (torch) are not affected."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: scikit-learn brings it
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
