"""Writing results: BIDS derivatives, deviation maps and HTML reports.

- :mod:`~normdiff_bids.outputs.names`: every derivative file name, from BIDS entities (one place).
- :mod:`~normdiff_bids.outputs.dataset`: output-folder checks, ``dataset_description.json``,
  ``.bidsignore``, the lock shared by parallel jobs, model cards.
- :mod:`~normdiff_bids.outputs.tables`: tidy <-> wide score tables, TSV + JSON sidecars, group tables.
- :mod:`~normdiff_bids.outputs.maps`: z painted into ``aparc+aseg`` (NIfTI) and onto surfaces (GIfTI).
- :mod:`~normdiff_bids.outputs.reports`: subject and group HTML reports (figures in ``figures``).
"""
