"""Nipype interface painting one subject's z-scores into its FreeSurfer segmentation and surfaces."""

from __future__ import annotations

import os

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


class _DeviationMapsInputSpec(BaseInterfaceInputSpec):
    scores = File(exists=True, mandatory=True, desc="wide score table (ScoreDeviations) holding the subject")
    participant_id = traits.Str(mandatory=True, desc="the subject's participant_id ('sub-<label>')")
    session_id = traits.Str(desc="the session_id ('ses-<label>') when the dataset has sessions")
    fs_subject_dir = Directory(exists=True, desc="the subject's FreeSurfer folder (mri/aparc+aseg.mgz; "
                                                 "surf/?h.white and label/?h.aparc.annot for surface maps); "
                                                 "without it no map is written")
    measures = traits.List(traits.Enum("volume", "thickness", "area"), ["volume", "thickness", "area"],
                           usedefault=True, desc="measures to map (one NIfTI per measure the model scores)")
    surfaces = traits.Bool(True, usedefault=True, desc="also write per-vertex GIfTI maps when surfaces exist")
    output_dir = Directory(desc="derivatives folder to write into; default: this node's working folder "
                                "(files keep their derivative names)")


class _DeviationMapsOutputSpec(TraitedSpec):
    volume_maps = OutputMultiObject(File(exists=True), desc="NIfTI maps (..._desc-<measure>_zmap.nii.gz)")
    surface_maps = OutputMultiObject(File(exists=True), desc="GIfTI per-vertex maps (..._zmap.func.gii)")
    surfaces = OutputMultiObject(File(exists=True), desc="the subject's white surfaces as .surf.gii")
    out_files = OutputMultiObject(File(exists=True), desc="every file written, sidecars included")


class DeviationMaps(SimpleInterface):
    """Write one subject's deviation maps: z per region in ``aparc+aseg`` (NIfTI) and per vertex (GIfTI)."""

    input_spec = _DeviationMapsInputSpec
    output_spec = _DeviationMapsOutputSpec
    _always_run = True  # a cached node must still put its files into the derivatives folder

    def _run_interface(self, runtime):
        from normdiff_bids.interfaces.tables import subject_row
        from normdiff_bids.outputs.maps import write_deviation_maps

        for key in ("volume_maps", "surface_maps", "surfaces", "out_files"):
            self._results[key] = []
        if not isdefined(self.inputs.fs_subject_dir):
            return runtime
        session = self.inputs.session_id if isdefined(self.inputs.session_id) else None
        row = subject_row(self.inputs.scores, self.inputs.participant_id, session)
        output_dir = self.inputs.output_dir if isdefined(self.inputs.output_dir) else runtime.cwd
        written = write_deviation_maps(output_dir, row, self.inputs.fs_subject_dir,
                                       measures=list(self.inputs.measures), surfaces=self.inputs.surfaces)
        for key, paths in written.items():
            paths = [os.fspath(p) for p in paths]
            self._results["out_files"].extend(paths)
            if key == "surfaces":
                self._results["surfaces"].extend(paths)
            else:
                self._results["volume_maps"].extend(p for p in paths if p.endswith(".nii.gz"))
                self._results["surface_maps"].extend(p for p in paths if p.endswith(".func.gii"))
        return runtime
