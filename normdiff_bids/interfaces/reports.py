"""Nipype interfaces writing the HTML reports: one per subject[/session], and the group report."""

from __future__ import annotations

import os
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)


def _maybe(value):
    return value if isdefined(value) else None


class _NormDiffReportInputSpec(BaseInterfaceInputSpec):
    scores = File(exists=True, mandatory=True, desc="wide score table (ScoreDeviations) holding the subject")
    participant_id = traits.Str(mandatory=True, desc="the subject's participant_id ('sub-<label>')")
    session_id = traits.Str(desc="the session_id ('ses-<label>') when the dataset has sessions")
    model_dir = Directory(exists=True, desc="the model bundle the scores came from (for centile curves "
                                            "and the model card)")
    model_name = traits.Str(desc="name of the model shown in the report")
    volume_maps = InputMultiObject(File(exists=True), desc="NIfTI deviation maps (DeviationMaps) to show "
                                                           "as slices")
    fs_subject_dir = Directory(exists=True,
                               desc="FreeSurfer folder whose mri/aparc+aseg.mgz underlies the maps")
    files = InputMultiObject(File(exists=True), desc="derivative files of this subject, listed in the report")
    num_threads = traits.Int(desc="CPU threads torch may use for the centile curves; default: torch's")
    output_dir = Directory(desc="derivatives folder to write into; default: this node's working folder")
    covariates = traits.List(traits.Dict(), desc="the covariate specification (CovariateSpecs.to_list()); "
                                                 "its age covariate is the axis of the centile curves")


class _ReportOutputSpec(TraitedSpec):
    out_report = File(exists=True, desc="the HTML report")


class NormDiffReport(SimpleInterface):
    """Write ``sub-<label>[_ses-<label>].html``: deviation profile, flagged IDPs on their centile curves,
    the joint deviation and slices of the deviation maps."""

    input_spec = _NormDiffReportInputSpec
    output_spec = _ReportOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        from normdiff_bids.interfaces.tables import subject_row
        from normdiff_bids.outputs.reports import write_subject_report

        row = subject_row(self.inputs.scores, self.inputs.participant_id, _maybe(self.inputs.session_id))
        model = None
        if isdefined(self.inputs.model_dir):
            from normdiff_bids.interfaces.model import set_threads
            from normdiff_bids.model.normative import load_model

            set_threads(self.inputs.num_threads)
            model = load_model(self.inputs.model_dir)
        from normdiff_bids.interfaces.subjects import label_volume as label_volume_of
        from normdiff_bids.interfaces.subjects import report_maps

        maps = report_maps(self.inputs.volume_maps if isdefined(self.inputs.volume_maps) else [])
        label_volume = label_volume_of(_maybe(self.inputs.fs_subject_dir))
        output_dir = self.inputs.output_dir if isdefined(self.inputs.output_dir) else runtime.cwd
        path = write_subject_report(
            output_dir, row, model=model, maps=maps or None, label_volume=label_volume if maps else None,
            files=list(self.inputs.files) if isdefined(self.inputs.files) else (),
            model_name=_maybe(self.inputs.model_name), covariates=_maybe(self.inputs.covariates))
        self._results["out_report"] = os.fspath(path)
        return runtime


class _GroupReportInputSpec(BaseInterfaceInputSpec):
    scores = File(exists=True, mandatory=True, desc="wide score table of the cohort")
    model_dir = Directory(exists=True, desc="the model bundle (its model card is shown)")
    model_name = traits.Str(desc="name of the model under OUTPUT_DIR/models/")
    metrics = File(exists=True, desc="JSON metrics of the held-out evaluation (TrainNormativeModel)")
    calibration_report = File(exists=True, desc="HTML calibration report to embed (TrainNormativeModel's "
                              "calibration_fragment; a full page is reduced to its body)")
    subject_reports = traits.List(traits.Str, desc="subject report names to link (relative to output_dir); "
                                                   "default: those already in output_dir")
    output_dir = Directory(desc="derivatives folder to write into; default: this node's working folder")
    covariates = traits.List(traits.Dict(), desc="the covariate specification (CovariateSpecs.to_list()): "
                                                 "the cohort is summarised by each covariate's kind")


class GroupReport(SimpleInterface):
    """Write ``group.html``: cohort, model card, calibration report and the cohort's deviations."""

    input_spec = _GroupReportInputSpec
    output_spec = _ReportOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        from normdiff_bids.interfaces.tables import read_table
        from normdiff_bids.outputs.reports import write_group_report

        card = None
        if isdefined(self.inputs.model_dir):
            from normdiff_bids.model.persistence import read_model_card

            card = read_model_card(self.inputs.model_dir)
        calibration = None
        if isdefined(self.inputs.calibration_report):
            calibration = Path(self.inputs.calibration_report).read_text(encoding="utf-8")
        kwargs = {}
        if isdefined(self.inputs.subject_reports) and self.inputs.subject_reports:
            kwargs["subject_reports"] = list(self.inputs.subject_reports)
        output_dir = self.inputs.output_dir if isdefined(self.inputs.output_dir) else runtime.cwd
        path = write_group_report(output_dir, read_table(self.inputs.scores), model_card=card,
                                  calibration_html=calibration, model_name=_maybe(self.inputs.model_name),
                                  covariates=_maybe(self.inputs.covariates), **kwargs)
        self._results["out_report"] = os.fspath(path)
        return runtime
