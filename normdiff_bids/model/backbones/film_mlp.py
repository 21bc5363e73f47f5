"""The FiLM-MLP denoiser (the paper's MLP backbone), its presets and its registry entry.

Shape contract: ``forward(x [B, D], t [B], cond [B, C]) -> [B, D]``; hyper-parameters in
:class:`FiLMMLPConfig`, which the model bundle stores so a saved model rebuilds itself exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from normdiff_bids.model.backbones import BackbonePreset, fixed_epochs, register_backbone
from normdiff_bids.model.config import ConfigDict

__all__ = ["FILM_MLP_PRESETS", "SMALL_COHORT_ROWS", "FiLMMLP", "FiLMMLPConfig", "default_config",
           "sinusoidal_embedding"]

_NORMS = ("batch", "layer", "none")


@dataclass
class FiLMMLPConfig(ConfigDict):
    """Hyper-parameters of :class:`FiLMMLP` (saved in the model bundle).

    Attributes
    ----------
    hidden : width of every block.
    n_blocks : number of Linear-Norm-FiLM-Dropout-PReLU blocks.
    dropout : dropout probability inside each block.
    norm : "batch" (the reference; eval mode uses running statistics), "layer" or "none".
    residual : add each block's input to its output (all blocks but the first, which changes width).
    time_embed_dim : size of the sinusoidal embedding of the noise-level input and of its MLP.
    time_scale : the noise-level input is multiplied by this before the sinusoid, so that inputs in
        [0, 1] (VP ``t / T``) or about [-2, 1] (EDM ``log(sigma) / 4``) spread over the embedding's
        frequencies the way integer timesteps 0..1000 do in the usual DDPM embedding.
    """

    hidden: int = 384
    n_blocks: int = 8
    dropout: float = 0.1
    norm: str = "batch"
    residual: bool = False
    time_embed_dim: int = 128
    time_scale: float = 1000.0

    def __post_init__(self):
        problems = []
        if self.hidden < 1 or self.n_blocks < 1 or self.time_embed_dim < 2 or self.time_embed_dim % 2:
            problems.append(f"hidden={self.hidden}, n_blocks={self.n_blocks}, time_embed_dim="
                            f"{self.time_embed_dim} (positive; time_embed_dim even)")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout={self.dropout} (need 0 <= dropout < 1)")
        if self.norm not in _NORMS:
            problems.append(f"norm={self.norm!r} (choose one of {_NORMS})")
        if problems:
            raise ValueError("invalid FiLMMLPConfig: " + "; ".join(problems))



#: Named FiLM-MLP configurations.
#:
#: ``"paper"``: the reference network (8 blocks x 384, BatchNorm, dropout 0.1, no residuals), about
#: 2.0M parameters with a 128-d time embedding (D=20, C=8).
#:
#: ``"default"``: 4 blocks x 256 with residual connections and LayerNorm, about 0.6M parameters (it had 6
#: blocks: 4 cost two thirds per evaluation at the same held-out calibration, docs/method.md). Why:
#: (1) cost: a network evaluation costs about 3x less than "paper" on 2 CPU cores (22 vs 71 us per
#: sample, grouped, D=200; docs/method.md), and both training (a 10k x 200 cohort must fit in 15 min)
#: and scoring (1000 samples x ~20 evaluations per subject) scale with it; (2) residual paths keep the
#: stack easy to optimise in the short training budgets that the time target allows; (3) LayerNorm
#: makes every row's output independent of its batch in training as well as in eval, so training
#: batches that mix timesteps do not share batch statistics, and eval needs no running statistics.
#:
#: ``"small-cohort"``: the default at half the width (4 blocks x 128, about a quarter of the
#: parameters), which the default preset takes for cohorts of fewer than :data:`SMALL_COHORT_ROWS`
#: rows: from 200 to 1000 training rows it calibrated as well as the 256-wide network at about half
#: the fit time (synthetic 20-site cohorts and fcon1000, docs/method.md), while at 6000 rows the
#: wider network was better for D=4 (mean |centile - truth| 0.0142 against 0.0164).
FILM_MLP_PRESETS: dict[str, FiLMMLPConfig] = {
    "paper": FiLMMLPConfig(hidden=384, n_blocks=8, dropout=0.1, norm="batch", residual=False),
    "default": FiLMMLPConfig(hidden=256, n_blocks=4, dropout=0.1, norm="layer", residual=True),
    "small-cohort": FiLMMLPConfig(hidden=128, n_blocks=4, dropout=0.1, norm="layer", residual=True),
}
#: Cohorts with fewer rows than this get the ``"small-cohort"`` network from the default preset.
SMALL_COHORT_ROWS = 2000


def default_config(n_rows: int, n_features: int) -> FiLMMLPConfig:
    """The default preset's network for a cohort of ``n_rows`` rows (see :data:`FILM_MLP_PRESETS`)."""
    return FILM_MLP_PRESETS["small-cohort" if n_rows < SMALL_COHORT_ROWS else "default"]


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``[cos(t f_k), sin(t f_k)]`` for ``dim/2`` geometrically spaced frequencies: ``t [B] -> [B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype if t.is_floating_point()
                                                                     else torch.float32)


class FiLMMLP(nn.Module):
    """MLP denoiser whose blocks are modulated by the covariates and the noise level (FiLM).

    Block: ``Linear -> Norm -> h * (1 + gamma) + beta -> Dropout -> PReLU`` (optionally ``+ input``),
    with ``(gamma, beta)`` of every block produced by one linear map of
    ``[cond, MLP(sinusoid(t))]``; a final ``Linear(hidden, D)`` reads out. The FiLM layer starts at zero,
    so an untrained network is an unmodulated MLP.

    Shapes
    ------
    ``forward(x [B, D], t [B], cond [B, C]) -> [B, D]``; or grouped:
    ``forward(x [R, S, D], t [R], cond [R, C]) -> [R, S, D]`` where the S samples of row r share
    ``t[r]`` and ``cond[r]``: the FiLM parameters are computed once per row and broadcast over its
    samples (same result as flattening, cheaper by the FiLM and time-embedding cost per sample).

    In eval mode one row's output never depends on the other rows of the batch (BatchNorm uses its
    running statistics; LayerNorm is per row).
    """

    supports_grouped_samples = True

    def __init__(self, n_features: int, cond_dim: int, config: FiLMMLPConfig | dict | None = None):
        super().__init__()
        if config is None:
            config = FiLMMLPConfig()
        elif isinstance(config, dict):
            config = FiLMMLPConfig.from_dict(config)
        if n_features < 1 or cond_dim < 0:
            raise ValueError(f"n_features={n_features} must be >= 1 and cond_dim={cond_dim} >= 0")
        self.config, self.n_features, self.cond_dim = config, n_features, cond_dim
        h, e = config.hidden, config.time_embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e), nn.SiLU())
        self.film = nn.Linear(cond_dim + e, 2 * h * config.n_blocks)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        widths = [n_features] + [h] * (config.n_blocks - 1)
        self.linears = nn.ModuleList(nn.Linear(w, h) for w in widths)
        self.norms = nn.ModuleList(_make_norm(config.norm, h) for _ in range(config.n_blocks))
        self.dropout = nn.Dropout(config.dropout)
        self.acts = nn.ModuleList(nn.PReLU() for _ in range(config.n_blocks))
        self.head = nn.Linear(h, n_features)

    def film_parameters(self, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``(gamma, beta)`` of every block for ``t [R]``, ``cond [R, C]``: ``[R, n_blocks, 2, hidden]``."""
        emb = self.time_mlp(sinusoidal_embedding(t * self.config.time_scale, self.config.time_embed_dim))
        params = self.film(torch.cat([cond.to(emb.dtype), emb], dim=-1))
        return params.view(-1, self.config.n_blocks, 2, self.config.hidden)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        grouped = x.dim() == 3
        if x.dim() not in (2, 3) or x.shape[-1] != self.n_features:
            raise ValueError(f"x must be [B, {self.n_features}] or [R, S, {self.n_features}], "
                             f"got {tuple(x.shape)}")
        rows = x.shape[0]
        if t.shape != (rows,) or cond.shape != (rows, self.cond_dim):
            raise ValueError(f"t must be [{rows}] and cond [{rows}, {self.cond_dim}], "
                             f"got {tuple(t.shape)} and {tuple(cond.shape)}")
        film = self.film_parameters(t, cond)
        n_per_row = x.shape[1] if grouped else 1
        h = x.reshape(rows * n_per_row, self.n_features)
        for i, (linear, norm, act) in enumerate(zip(self.linears, self.norms, self.acts)):
            z = norm(linear(h)).view(rows, n_per_row, -1)
            z = z * (1 + film[:, None, i, 0]) + film[:, None, i, 1]
            z = act(self.dropout(z.view(rows * n_per_row, -1)))
            h = h + z if self.config.residual and i > 0 else z
        out = self.head(h)
        return out.view(rows, n_per_row, self.n_features) if grouped else out


def _make_norm(kind: str, width: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(width)
    if kind == "layer":
        return nn.LayerNorm(width)
    return nn.Identity()


#: Both presets train with AdamW at 1e-3 and batch 1024 (the paper's); the default trains for the step
#: budget (:func:`~normdiff_bids.model.backbones.step_budget_epochs`), the paper's for 1500 epochs.
register_backbone("film-mlp", FiLMMLP, FiLMMLPConfig, presets={
    "default": BackbonePreset(config=default_config),
    "paper": BackbonePreset(config=lambda n_rows, n_features: FILM_MLP_PRESETS["paper"],
                            epochs=fixed_epochs(1500)),
})
