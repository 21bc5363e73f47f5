"""Nipype interface writing every per-subject output of a batch of subjects in one node: the deviation
table, the deviation maps and the report of each.

One node per batch, not three per subject: the score table is read once and the model loaded once per
batch, and a cohort of 300 starts a handful of processes instead of 900 (on 2 cores the per-node start-up
and re-reading used to be most of the participant level). A subject's files do not depend on the batch
it is written in. A subject that fails does not stop the others of its batch; the node fails at the end,
naming every failed subject, with the others' files written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from normdiff_bids.errors import NormdiffError, OutputError

_MAP_MEASURE = re.compile(r"_desc-([A-Za-z0-9]+)_zmap\.nii(\.gz)?$")


def report_maps(paths) -> dict[str, str]:
    """``{measure: path}`` of the NIfTI deviation maps among ``paths`` (what a report shows as slices)."""
    maps = {}
    for path in paths:
        found = _MAP_MEASURE.search(os.path.basename(path))
        if found:
            maps[found.group(1)] = os.fspath(path)
    return maps


def label_volume(fs_subject_dir) -> Path | None:
    """The ``mri/aparc+aseg.mgz`` of a FreeSurfer subject folder, which the maps are painted into (``None``
    without a folder or the file)."""
    if not fs_subject_dir:
        return None
    candidate = Path(fs_subject_dir) / "mri" / "aparc+aseg.mgz"
    return candidate if candidate.is_file() else None


def _write_report(output_dir, row, files, model, fs_subject_dir, model_name, covariates=None) -> str:
    """A subject's report listing ``files``, with slices of the NIfTI maps among them."""
    from normdiff_bids.outputs.reports import write_subject_report

    volume_maps = report_maps(files)
    return os.fspath(write_subject_report(
        output_dir, row, model=model, maps=volume_maps or None,
        label_volume=label_volume(fs_subject_dir) if volume_maps else None, files=files,
        model_name=model_name, covariates=covariates))


def write_subject_outputs(output_dir, wide_row, model=None, fs_subject_dir=None,
                          model_name=None, covariates=None) -> tuple[list[str], str]:
    """Write one subject's deviation table, maps (with ``fs_subject_dir``) and report from its one-row
    wide score table ``wide_row``. Returns ``(files written, report path)``. ``covariates``: the
    covariate specification (the report's centile curves run over its age covariate)."""
    from normdiff_bids.outputs.maps import write_deviation_maps
    from normdiff_bids.outputs.score_files import write_subject_scores

    row = wide_row.iloc[0]
    files = [os.fspath(p) for p in write_subject_scores(output_dir, wide_row)]
    if fs_subject_dir:
        written = write_deviation_maps(output_dir, row, fs_subject_dir)
        files += [os.fspath(p) for paths in written.values() for p in paths]
    return files, _write_report(output_dir, row, files, model, fs_subject_dir, model_name, covariates)


def write_subject_report_only(output_dir, wide_row, model=None, fs_subject_dir=None,
                              model_name=None, covariates=None) -> str:
    """Re-write one subject's report from its score row and the files already written for it (its
    deviation table and maps stay as they are). Returns the report path."""
    from normdiff_bids.outputs import names

    row = wide_row.iloc[0]
    entities = names.subject_entities(row["participant_id"], row.get("session_id"))
    folder = Path(output_dir) / names.scores_table_path(entities).parent
    prefix = names.subject_report_path(entities).stem + "_"  # sub-<label>[_ses-<label>]_
    files = sorted(os.fspath(p) for p in folder.glob(f"{prefix}*") if p.is_file())
    return _write_report(output_dir, row, files, model, fs_subject_dir, model_name, covariates)


class _SubjectOutputsInputSpec(BaseInterfaceInputSpec):
    scores = File(exists=True, mandatory=True, desc="wide score table (ScoreDeviations) holding the subjects")
    subjects = traits.List(traits.Dict(), mandatory=True,
                           desc="one mapping per subject[/session]: participant_id, session_id (or None) "
                                "and optionally fs_subject_dir (its FreeSurfer folder, for the maps)")
    model_dir = Directory(exists=True, desc="the model bundle the scores came from (centile curves and "
                                            "the model card of the reports)")
    model_name = traits.Str(desc="name of the model shown in the reports")
    num_threads = traits.Int(desc="CPU threads torch may use; default: torch's")
    output_dir = Directory(mandatory=True, desc="the derivatives folder (prepared by prepare_output_dir)")
    reports_only = traits.Bool(False, usedefault=True,
                               desc="re-write only the reports, from the score table and the files already "
                                    "in the derivatives folder")
    covariates = traits.List(traits.Dict(), desc="the covariate specification (CovariateSpecs.to_list()); "
                                                 "its age covariate is the axis of the reports' centile "
                                                 "curves")


class _SubjectOutputsOutputSpec(TraitedSpec):
    out_files = OutputMultiObject(File(exists=True), desc="every table and map written, sidecars included")
    out_reports = OutputMultiObject(File(exists=True), desc="the HTML reports, one per subject[/session]")


class SubjectOutputs(SimpleInterface):
    """Write the deviation table, deviation maps and report of each subject of a batch."""

    input_spec = _SubjectOutputsInputSpec
    output_spec = _SubjectOutputsOutputSpec
    _always_run = True  # a cached node must still put its files into the derivatives folder

    def _run_interface(self, runtime):
        from normdiff_bids.interfaces.tables import read_table, select_row

        wide = read_table(self.inputs.scores)
        model = None
        if isdefined(self.inputs.model_dir):
            from normdiff_bids.interfaces.model import set_threads
            from normdiff_bids.model.normative import load_model

            set_threads(self.inputs.num_threads)
            model = load_model(self.inputs.model_dir)
        name = self.inputs.model_name if isdefined(self.inputs.model_name) else None
        covariates = self.inputs.covariates if isdefined(self.inputs.covariates) else None
        self._results["out_files"], self._results["out_reports"] = [], []
        failed = {}  # "sub-X[ ses-Y]" -> the error that stopped its outputs
        for subject in self.inputs.subjects:
            pid, ses = subject["participant_id"], subject.get("session_id") or None
            try:
                row = select_row(wide, pid, ses, self.inputs.scores)
                where = {"model": model, "fs_subject_dir": subject.get("fs_subject_dir"), "model_name": name,
                         "covariates": covariates}
                if self.inputs.reports_only:
                    files, report = [], write_subject_report_only(self.inputs.output_dir, row, **where)
                else:
                    files, report = write_subject_outputs(self.inputs.output_dir, row, **where)
            except (NormdiffError, OSError, ValueError) as err:
                failed[f"{pid}{' ' + ses if ses else ''}"] = err
                continue
            self._results["out_files"] += files
            self._results["out_reports"].append(report)
        if failed:
            # exit 3 when only the output folder failed
            error = OutputError if all(isinstance(e, OutputError) for e in failed.values()) else NormdiffError
            lines = "\n  ".join(f"{subject}: {err}" for subject, err in failed.items())
            raise error(f"{len(failed)} of {len(self.inputs.subjects)} subjects of this batch failed (the "
                        f"others' outputs are written):\n  {lines}")
        return runtime
