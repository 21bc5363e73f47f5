"""Nipype interface gathering covariates and FreeSurfer IDPs of a BIDS dataset into one table."""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    Undefined,
    isdefined,
    traits,
)

from normdiff_bids.bidsio import write_json
from normdiff_bids.interfaces.tables import write_table


class _CollectIDPsInputSpec(BaseInterfaceInputSpec):
    bids_dir = Directory(exists=True, mandatory=True,
                         desc="raw BIDS dataset; participants.tsv (and sessions.tsv) hold the covariates")
    fs_dir = Directory(exists=True,
                       desc="FreeSurfer SUBJECTS_DIR; default: found under BIDS_DIR/derivatives")
    participant_label = traits.List(traits.Str, desc="participants to collect (with or without 'sub-'); "
                                                     "default: all")
    session_label = traits.List(traits.Str, desc="sessions to collect (with or without 'ses-'); default: all")
    idp_set = traits.List(traits.Str, ["aseg"], usedefault=True,
                          desc="IDP selection: named sets (aseg, aparc-thickness, ...), IDP names or globs")
    covariates = traits.List(traits.Dict(), desc="the covariates to read: a covariate specification "
                                                 "(normdiff_bids.covariate_spec.CovariateSpecs.to_list(): "
                                                 "name, column, kind and role of each); when given, "
                                                 "age_column, sex_column and site_column stay unset")
    age_column = traits.Str("age", usedefault=True, desc="participants.tsv/sessions.tsv column holding age "
                                                         "(without covariates)")
    sex_column = traits.Str("sex", usedefault=True, desc="participants.tsv column holding sex "
                                                         "(without covariates)")
    site_column = traits.Either(None, traits.Str, default="site", usedefault=True,
                                desc="participants.tsv column holding the site (None: no site; without "
                                     "covariates)")
    longitudinal = traits.Bool(False, usedefault=True,
                               desc="read FreeSurfer's longitudinal folders (<timepoint>.long.<template>) "
                                    "instead of the cross-sectional sub-<label>[_ses-<label>] ones")
    rescan = traits.Bool(False, usedefault=True,
                         desc="read the dataset on every run instead of reusing Nipype's cache (the cache "
                              "knows the dataset only by its path); pair it with content hashing so that "
                              "downstream nodes still resume when the table did not change")


class _CollectIDPsOutputSpec(TraitedSpec):
    idp_table = File(exists=True, desc="TSV, one row per participant (and session): ids, covariates, IDPs")
    report = File(exists=True, desc="JSON: what was found, and what was missing for whom")


class CollectIDPs(SimpleInterface):
    """Read covariates and FreeSurfer stats of the selected participants into one IDP table.

    >>> collect = CollectIDPs(bids_dir="/data/bids", participant_label=["01", "02"], idp_set=["aseg"])
    >>> collect.run().outputs.idp_table    # doctest: +SKIP
    """

    input_spec = _CollectIDPsInputSpec
    output_spec = _CollectIDPsOutputSpec

    @property
    def always_run(self):
        return bool(self.inputs.rescan)

    def _run_interface(self, runtime):
        from normdiff_bids.data.idps import collect_idps

        def given(value):
            return value if isdefined(value) and value != [] else None

        table, report = collect_idps(
            self.inputs.bids_dir,
            fs_dir=given(self.inputs.fs_dir),
            participant_label=given(self.inputs.participant_label),
            session_label=given(self.inputs.session_label),
            idp_set=list(self.inputs.idp_set),
            age_column=self.inputs.age_column,
            sex_column=self.inputs.sex_column,
            site_column=None if self.inputs.site_column is Undefined else self.inputs.site_column,
            longitudinal=bool(self.inputs.longitudinal),
            covariates=given(self.inputs.covariates),
        )
        self._results["idp_table"] = write_table(table, os.path.join(runtime.cwd, "idps.tsv"))
        report_path = write_json(os.path.join(runtime.cwd, "collect_report.json"), report)
        self._results["report"] = os.fspath(report_path)
        return runtime

