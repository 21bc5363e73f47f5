"""Nipype interfaces: thin wrappers over the library, one module per concern.

- :mod:`.collect`: :class:`CollectIDPs` (BIDS + FreeSurfer -> IDP table)
- :mod:`.model`: :class:`TrainNormativeModel`, :class:`ScoreDeviations`
- :mod:`.maps`: :class:`DeviationMaps` (NIfTI + GIfTI)
- :mod:`.reports`: :class:`NormDiffReport` (subject), :class:`GroupReport`
- :mod:`.subjects`: :class:`SubjectOutputs` (table, maps and report of each subject of a batch)
- :mod:`.derivatives`: writers into the derivatives folder (:class:`WriteSubjectScores`,
  :class:`WriteGroupTable`, :class:`InstallModel`)

Importing this package imports Nipype but not torch; the model is loaded inside the nodes.
"""

from normdiff_bids.interfaces.collect import CollectIDPs
from normdiff_bids.interfaces.derivatives import InstallModel, WriteGroupTable, WriteSubjectScores
from normdiff_bids.interfaces.maps import DeviationMaps
from normdiff_bids.interfaces.model import AdaptNormativeModel, ScoreDeviations, TrainNormativeModel
from normdiff_bids.interfaces.reports import GroupReport, NormDiffReport
from normdiff_bids.interfaces.subjects import SubjectOutputs

__all__ = [
    "AdaptNormativeModel",
    "CollectIDPs",
    "DeviationMaps",
    "GroupReport",
    "InstallModel",
    "NormDiffReport",
    "ScoreDeviations",
    "SubjectOutputs",
    "TrainNormativeModel",
    "WriteGroupTable",
    "WriteSubjectScores",
]
