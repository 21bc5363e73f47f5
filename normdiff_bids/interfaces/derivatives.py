"""Nipype interfaces that write into the derivatives folder: subject tables, group tables, the model.

Like nipreps' DataSinks they always run (a cached node must still put its files in place) and every file
is written atomically through :mod:`normdiff_bids.outputs`, under the output folder's lock where files
are shared between jobs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from normdiff_bids.errors import OutputError


class _SinkInputSpec(BaseInterfaceInputSpec):
    output_dir = Directory(mandatory=True, desc="the derivatives folder (prepared by prepare_output_dir)")


class _WriteSubjectScoresInputSpec(_SinkInputSpec):
    scores = File(exists=True, mandatory=True, desc="wide score table (ScoreDeviations) holding the subject")
    participant_id = traits.Str(mandatory=True, desc="the subject's participant_id ('sub-<label>')")
    session_id = traits.Str(desc="the session_id ('ses-<label>') when the dataset has sessions")


class _FilesOutputSpec(TraitedSpec):
    out_files = OutputMultiObject(File(exists=True), desc="files written into the derivatives folder")


class WriteSubjectScores(SimpleInterface):
    """Write one subject's deviation table (one row per IDP) and its JSON sidecar."""

    input_spec = _WriteSubjectScoresInputSpec
    output_spec = _FilesOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        from normdiff_bids.interfaces.tables import subject_scores
        from normdiff_bids.outputs.score_files import write_subject_scores

        session = self.inputs.session_id if isdefined(self.inputs.session_id) else None
        row = subject_scores(self.inputs.scores, self.inputs.participant_id, session)
        self._results["out_files"] = [os.fspath(p) for p in write_subject_scores(self.inputs.output_dir, row)]
        return runtime


class _WriteGroupTableInputSpec(_SinkInputSpec):
    scores = File(exists=True, mandatory=True, desc="wide score table of every scored participant")
    split = File(exists=True, desc="TSV of the reference rows and their split (train/holdout)")
    covariates = traits.List(traits.Dict(), desc="the covariate specification (CovariateSpecs.to_list()) "
                                                 "the sidecar describes the covariate columns by (source "
                                                 "column, kind, levels); default: by their names")


class WriteGroupTable(SimpleInterface):
    """Write ``phenotype/normdiff_deviations.tsv`` (every row scored by the group level) and
    ``phenotype/normdiff_reference.tsv`` (which rows trained the model, which evaluated it); with
    sessions, one ``..._ses-<label>.tsv`` of each per session."""

    input_spec = _WriteGroupTableInputSpec
    output_spec = _FilesOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        from normdiff_bids.interfaces.tables import read_table
        from normdiff_bids.outputs.score_files import write_group_table, write_reference_table

        wide = read_table(self.inputs.scores)
        covariates = self.inputs.covariates if isdefined(self.inputs.covariates) else None
        written = list(write_group_table(self.inputs.output_dir, wide, merge=False, covariates=covariates))
        if isdefined(self.inputs.split):
            split = read_table(self.inputs.split)
            ids = [c for c in ("participant_id", "session_id") if c in wide.columns]
            reference = wide[ids].merge(split, on=ids, how="left")
            reference["split"] = reference["split"].fillna("none")
            written += write_reference_table(self.inputs.output_dir, reference)
        self._results["out_files"] = [os.fspath(p) for p in written]
        return runtime


class _InstallModelInputSpec(_SinkInputSpec):
    model_dir = Directory(exists=True, mandatory=True, desc="the trained model bundle to install")
    model_name = traits.Str("default", usedefault=True, desc="folder name under OUTPUT_DIR/models/")
    overwrite = traits.Bool(False, usedefault=True,
                            desc="replace an existing, different model of that name (default: refuse)")
    after = InputMultiObject(File(), desc="files that must be written first (orders the workflow)")
    after_report = File(desc="a report that must be written first (orders the workflow)")


class _InstallModelOutputSpec(TraitedSpec):
    model_dir = Directory(exists=True, desc="the installed bundle, OUTPUT_DIR/models/<name>")
    model_card = File(exists=True, desc="the model card, OUTPUT_DIR/models/<name>_modelcard.json")


class InstallModel(SimpleInterface):
    """Copy a model bundle to ``OUTPUT_DIR/models/<name>`` with its model card.

    An existing bundle with the same weights is left as it is (a resumed run is a no-op); a different one
    is only replaced with ``overwrite=True``, and then atomically.
    """

    input_spec = _InstallModelInputSpec
    output_spec = _InstallModelOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        from normdiff_bids.atomic import atomic_directory
        from normdiff_bids.bidsio import write_json
        from normdiff_bids.model.normative import load_model
        from normdiff_bids.outputs import names
        from normdiff_bids.outputs.dataset import output_lock

        output_dir = Path(self.inputs.output_dir)
        source = Path(self.inputs.model_dir)
        dest = output_dir / names.model_dir(self.inputs.model_name)
        model = load_model(source, device="cpu")  # verifies the bundle before it is published
        with output_lock(output_dir):
            if dest.exists() and weights_digest(dest) != weights_digest(source):
                if not self.inputs.overwrite:
                    raise OutputError(
                        f"{dest} already holds a different model; pass --model-name NEW to keep both, or "
                        f"--overwrite-model to replace it")
            if not dest.exists() or weights_digest(dest) != weights_digest(source):
                with atomic_directory(dest, overwrite=True) as tmp:
                    for item in source.iterdir():
                        shutil.copy2(item, tmp / item.name)
            card = output_dir / names.model_card_path(self.inputs.model_name)
            write_json(card, model.model_card())
        self._results["model_dir"] = os.fspath(dest)
        self._results["model_card"] = os.fspath(card)
        return runtime


def weights_digest(model_dir: str | os.PathLike) -> str | None:
    """The sha256 of a bundle's weights as its manifest records it (None when unreadable)."""
    from normdiff_bids.model.bundle import weights_digest as recorded_digest

    return recorded_digest(model_dir)
