"""Writing results: BIDS derivatives, deviation maps and HTML reports.

- :mod:`~normdiff_bids.outputs.names`: every derivative file name, from BIDS entities (one place).
- :mod:`~normdiff_bids.outputs.dataset`: output-folder checks, ``dataset_description.json``,
  ``.bidsignore``, the lock shared by parallel jobs, model cards.
- :mod:`~normdiff_bids.outputs.score_tables`: tidy <-> wide score tables and their columns.
- :mod:`~normdiff_bids.outputs.sidecars`: the JSON sidecars' description of every table and column.
- :mod:`~normdiff_bids.outputs.score_files`: the per-subject, group and reference TSV files, read back.
- :mod:`~normdiff_bids.outputs.maps`: z painted into ``aparc+aseg`` (NIfTI) and onto surfaces (GIfTI).
- :mod:`~normdiff_bids.outputs.reports`: subject and group HTML reports (figures in ``figures``).
"""
