"""Reading inputs: FreeSurfer stats files, BIDS datasets, IDP tables, synthetic cohorts."""

from normdiff_bids.data.idps import collect_idps

__all__ = ["collect_idps"]
