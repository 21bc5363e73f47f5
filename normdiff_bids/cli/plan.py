"""What a run is made of once its inputs are checked (:class:`Plan`), and how the CLI speaks to the user
(:func:`say`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from normdiff_bids.covariate_spec import CovariateSpecs


@dataclass
class Plan:
    """Everything the run needs, resolved and checked."""

    bids_dir: Path
    output_dir: Path
    levels: list[str]
    participant_label: list[str] | None
    session_label: list[str] | None
    fs_dir: Path | None
    #: The covariates: from the command line, then with the kinds read from participants.tsv (group
    #: level) or as the model has them (participant level, --from-model).
    covariates: CovariateSpecs
    longitudinal: bool = False  # read FreeSurfer's <timepoint>.long.<template> folders, not sub-X[_ses-Y]
    reference_participants: list[str] | None = None
    model_dir: Path | None = None
    model_options: dict | None = None
    model: object = None  # the loaded model (participant level)
    base_model: object = None  # the model --from-model adapts (group level)
    rows: list[dict] = field(default_factory=list)  # rows the participant level writes files for
    table: object = None  # the IDP table collected while checking (pandas DataFrame)
    group_table: object = None  # the group level's score tables, read while checking (--reports-only)
    group_done: bool = False  # the group level of this run has finished (its model is installed)
    validation: dict | None = None  # what the BIDS validator said, for the run record
    no_freesurfer: list[str] = field(default_factory=list)  # rows left out: no FreeSurfer folder found


def say(message: str, *, quiet: bool = False, always: bool = False) -> None:
    if always or not quiet:
        print(message, file=sys.stderr, flush=True)
