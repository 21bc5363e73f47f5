"""Serialisation shared by the model's dataclass configs (diffusion, FiLM-MLP, SAINT) for the bundle."""

from __future__ import annotations

from dataclasses import asdict, fields


class ConfigDict:
    """Mixin for dataclass configs: ``to_dict`` for the bundle, ``from_dict`` refusing unknown fields.

    ``_unknown_message`` names the offending and the valid fields; a config may phrase it its own way.
    """

    _unknown_message = "unknown {name} field(s) {unknown}; known fields: {known}"

    def to_dict(self) -> dict:
        """Plain JSON-safe dict of every field (what the bundle stores)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None):
        """Rebuild from :meth:`to_dict` output; unknown fields raise a ``ValueError`` naming them."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(cls._unknown_message.format(name=cls.__name__, unknown=unknown,
                                                         known=sorted(known)))
        return cls(**values)
