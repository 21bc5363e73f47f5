"""The denoising networks of a model: one, or several trained on the same rows whose draws are pooled
(``NormativeDiffusion(n_networks=K)``).

A model with one network keeps a plain encoder and network (its bundle, seeds and draws are those of
earlier versions); a model with several keeps them as ``torch.nn.ModuleList`` s, whose weights are saved
under ``encoder.<k>.`` and ``network.<k>.``. Each point's draws are split between the networks in
consecutive blocks, drawn from the same noise a single network would use.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MEMBER_SEED_STEP", "member_seed", "members", "module_list", "sample_blocks"]

#: Network k of a model with seed s is initialised and trained with seed ``s + MEMBER_SEED_STEP * k``.
MEMBER_SEED_STEP = 100


def member_seed(seed: int, member: int) -> int:
    """The seed that initialises and trains network ``member`` of a model with ``seed``."""
    return int(seed) + MEMBER_SEED_STEP * int(member)


def module_list(modules: list):
    """One module as itself; several as a ``torch.nn.ModuleList``."""
    if len(modules) == 1:
        return modules[0]
    from torch import nn

    return nn.ModuleList(modules)


def members(encoder, network) -> list[tuple]:
    """``[(encoder, network), ...]``, one pair per network, of a model's fitted modules."""
    from torch import nn

    if isinstance(network, nn.ModuleList):
        return list(zip(encoder, network))
    return [(encoder, network)]


def sample_blocks(n_samples: int, n_members: int) -> list[slice]:
    """The consecutive blocks of a point's ``n_samples`` draws that each network draws (sizes differ by
    at most one)."""
    edges = np.linspace(0, n_samples, n_members + 1).round().astype(int)
    return [slice(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:])]
