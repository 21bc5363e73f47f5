"""Former home of the deviation tables, kept so that old imports work. The tables now live by job:
:mod:`~normdiff_bids.outputs.score_tables` (tidy <-> wide), :mod:`~normdiff_bids.outputs.sidecars`
(column descriptions) and :mod:`~normdiff_bids.outputs.score_files` (the TSV files).

The conversion is not kept here: the sidecars and the files import it, and this module re-exports them,
so that would be an import cycle.
"""

from normdiff_bids.outputs.score_files import (
    REFERENCE_TABLE_NAME,
    TEXT_COLUMNS,
    read_group_table,
    read_scores_table,
    write_group_table,
    write_reference_table,
    write_subject_scores,
    write_tsv,
)
from normdiff_bids.outputs.score_tables import (
    ID_COLUMNS,
    IDP_FIELDS,
    SUBJECT_SCORE_COLUMNS,
    TIDY_COLUMNS,
    covariate_columns,
    given_idps,
    idps_of_wide,
    scores_to_long,
    scores_to_wide,
    subject_rows,
    subject_table,
    wide_row,
    z_by_idp,
)
from normdiff_bids.outputs.sidecars import Z_UNITS, column_descriptions

__all__ = [
    "ID_COLUMNS", "IDP_FIELDS", "SUBJECT_SCORE_COLUMNS", "TIDY_COLUMNS", "TEXT_COLUMNS", "Z_UNITS",
    "REFERENCE_TABLE_NAME", "scores_to_wide", "scores_to_long", "idps_of_wide", "given_idps",
    "covariate_columns", "subject_rows", "subject_table", "wide_row", "z_by_idp", "column_descriptions",
    "write_tsv", "read_scores_table", "write_subject_scores", "write_group_table", "write_reference_table",
    "read_group_table",
]
