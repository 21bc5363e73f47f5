"""The covariate encoder: the network's module that maps encoded covariates (a
:class:`~normdiff_bids.model.covariates.CovariateSchema`'s) to the backbone's conditioning vector."""

from __future__ import annotations

import torch
from torch import nn

from normdiff_bids.model.covariates import UNKNOWN_INDEX, CovariateEncoderConfig, CovariateSchema

__all__ = ["CovariateEncoder"]


class CovariateEncoder(nn.Module):
    """Map encoded covariates to the conditioning vector of the backbone.

    Shapes: ``cont`` float [B, n_cont], ``cat`` int64 [B, n_cat] -> ``cond`` [B, C] with
    ``C = n_cont + sum(embedding widths)`` (:attr:`cond_dim`). Rows are independent of each other.
    In training mode, covariates trained with an unknown level are replaced by it with probability
    ``config.unknown_dropout``, using ``generator`` when given (reproducible training).
    """

    def __init__(self, schema: CovariateSchema, config: CovariateEncoderConfig | None = None):
        super().__init__()
        self.config = config or CovariateEncoderConfig()
        self.n_continuous = schema.n_continuous
        self.embeddings = nn.ModuleList()
        widths = []
        for cov in schema.categorical:
            n = len(cov.levels) + 1
            width = min(self.config.embedding_dim, n)
            self.embeddings.append(nn.Embedding(n, width))
            widths.append(width)
        self.register_buffer("marginal", torch.tensor([c.marginal for c in schema.categorical],
                                                       dtype=torch.bool), persistent=False)
        self.cond_dim = self.n_continuous + sum(widths)

    def forward(self, cont: torch.Tensor, cat: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        if self.training and self.config.unknown_dropout > 0 and bool(self.marginal.any()):
            # drawn on the generator's device (training draws all randomness from one CPU stream)
            u = torch.rand(cat.shape, generator=generator,
                           device=generator.device if generator is not None else cat.device)
            drop = u.to(cat.device) < self.config.unknown_dropout
            cat = torch.where(drop & self.marginal, torch.full_like(cat, UNKNOWN_INDEX), cat)
        parts = [cont.to(torch.float32)]
        parts += [emb(cat[:, j]) for j, emb in enumerate(self.embeddings)]
        return torch.cat(parts, dim=1)
