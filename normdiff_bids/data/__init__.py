"""Reading inputs: FreeSurfer stats files, BIDS datasets, IDP tables, synthetic cohorts."""
