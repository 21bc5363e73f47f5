"""Use normdiff-bids nodes inside your own Nipype workflow.

The workflow below is the kind a lab writes for itself: it picks the healthy controls of a study as the
normative reference, trains a model on them, scores everyone, and feeds the scores into the lab's own
node (here: count, per participant, the IDPs outside the central 95% of the normative distribution).

    python workflows/embed_in_nipype.py BIDS_DIR WORK_DIR [--reference-query "group == 'control'"]
                                        [--plugin MultiProc] [--epochs 300]

Nothing is written outside WORK_DIR: the nodes' files stay in Nipype's working folders, and the final
table is ``WORK_DIR/embed_example_wf/count_extremes/extreme_counts.tsv``.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("NIPYPE_NO_ET", "1")

from nipype.interfaces.utility import Function  # noqa: E402
from nipype.pipeline import engine as pe  # noqa: E402

from normdiff_bids.interfaces import CollectIDPs, ScoreDeviations, TrainNormativeModel  # noqa: E402


def count_extremes(scores, threshold=1.96):
    """The lab's own step: IDPs with |z| above ``threshold`` per participant (a plain function node)."""
    import os

    import pandas as pd

    table = pd.read_csv(scores, sep="\t", na_values=["n/a"], keep_default_na=False,
                        dtype={"participant_id": str})
    z_columns = [c for c in table.columns if c.endswith("_z") and c != "joint_z"]
    out = table[["participant_id"]].copy()
    out["n_extreme"] = (table[z_columns].abs() > threshold).sum(axis=1)
    out["joint_z"] = table["joint_z"]
    path = os.path.abspath("extreme_counts.tsv")
    out.to_csv(path, sep="\t", index=False)
    return path


def build_workflow(bids_dir, *, reference_query=None, idp_set=("aseg",), epochs=None, n_samples=None,
                   model_options=None, name="embed_example_wf") -> pe.Workflow:
    """A user's workflow with three normdiff-bids nodes and one of their own."""
    wf = pe.Workflow(name=name)
    collect = pe.Node(CollectIDPs(bids_dir=os.path.abspath(bids_dir), idp_set=list(idp_set)), name="collect")
    train = pe.Node(TrainNormativeModel(backbone="film-mlp", seed=0, device="auto"), name="train")
    if reference_query:
        train.inputs.reference_query = reference_query
    if epochs:
        train.inputs.epochs = epochs
    if model_options:
        train.inputs.model_options = dict(model_options)
    score = pe.Node(ScoreDeviations(), name="score")
    if n_samples:
        score.inputs.n_samples = n_samples
    extremes = pe.Node(Function(input_names=["scores", "threshold"], output_names=["table"],
                                function=count_extremes), name="count_extremes")
    extremes.inputs.threshold = 1.96
    wf.connect([
        (collect, train, [("idp_table", "idp_table")]),
        (collect, score, [("idp_table", "idp_table")]),
        (train, score, [("model_dir", "model_dir")]),
        (score, extremes, [("scores", "scores")]),
    ])
    return wf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bids_dir")
    parser.add_argument("work_dir")
    parser.add_argument("--reference-query", default=None)
    parser.add_argument("--plugin", default="Linear", choices=("Linear", "MultiProc"))
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--n-samples", type=int, default=None)
    args = parser.parse_args(argv)
    wf = build_workflow(args.bids_dir, reference_query=args.reference_query, epochs=args.epochs,
                        n_samples=args.n_samples)
    wf.base_dir = os.path.abspath(args.work_dir)
    plugin_args = {"n_procs": args.nprocs, "mp_context": "forkserver"} if args.plugin == "MultiProc" else {}
    wf.run(plugin=args.plugin, plugin_args=plugin_args)
    print(os.path.join(wf.base_dir, wf.name, "count_extremes", "extreme_counts.tsv"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
