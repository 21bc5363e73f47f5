"""Score participants on a SLURM cluster through Nipype's SLURM plugin: every node is one batch job.

The alternative to ``slurm_array.sh`` when you prefer one command that submits and tracks all jobs
(Nipype polls ``squeue`` and submits each node once its inputs exist). Run it on a login node:

    python workflows/nipype_slurm.py BIDS_DIR OUTPUT_DIR --work-dir /scratch/$USER/normdiff-work \
        [--participant-label 01 02 ...] [--model OUTPUT_DIR/models/default] \
        [--sbatch-args "-p short --time=00:20:00 --mem=4G"] \
        [--gpu-sbatch-args "-p gpu --gres=gpu:1"] [--dry-run]

``--dry-run`` builds the workflow and the plugin, prints the jobs it would submit, and submits nothing.
The same inputs are checked as by ``normdiff-bids ... participant`` (errors name the culprit); the work
folder must be on a file system the compute nodes share.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import sys

os.environ.setdefault("NIPYPE_NO_ET", "1")

#: Options that set the torch threads of a node; without one, a job uses the CPUs its sbatch options ask for.
THREAD_OPTIONS = {"--omp-nthreads", "--nprocs", "--n-cpus", "--n_cpus", "--nthreads"}


def cpus_per_task(sbatch_args: str) -> int:
    """The CPUs a job asks for in ``sbatch_args`` (the last ``-c``/``--cpus-per-task`` wins, as in sbatch),
    1 without one."""
    found = re.findall(r"(?:^|\s)(?:--cpus-per-task[= ]|-c ?)(\d+)\b", sbatch_args)
    return int(found[-1]) if found else 1


def build(argv) -> tuple:
    """Check the inputs and build ``(workflow, plugin_args, plan)`` for the participant level on SLURM."""
    from normdiff_bids.cli.parser import build_parser
    from normdiff_bids.cli.run import check_inputs, participant_workflow

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bids_dir")
    parser.add_argument("output_dir")
    parser.add_argument("--work-dir", required=True,
                        help="shared work folder (the compute nodes must see it)")
    parser.add_argument("--participant-label", nargs="+", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--sbatch-args", default="--time=00:30:00 --mem=4G --cpus-per-task=1",
                        help="sbatch options of every job")
    parser.add_argument("--gpu-sbatch-args", default=None,
                        help="sbatch options of the scoring job when it should run on a GPU node")
    parser.add_argument("--max-jobs", type=int, default=50, help="jobs queued at once")
    parser.add_argument("--dry-run", action="store_true", help="build and print, submit nothing")
    args, extra = parser.parse_known_args(argv)

    # --plugin SLURM: the jobs run on compute nodes, so this host's devices are not checked
    app_argv = [args.bids_dir, args.output_dir, "participant", "--work-dir", args.work_dir,
                "--plugin", "SLURM", *extra]
    if args.participant_label:
        app_argv += ["--participant-label", *args.participant_label]
    if args.model:
        app_argv += ["--model", args.model]
    if args.gpu_sbatch_args:
        app_argv += ["--device", "cuda"]
    # Else torch would start as many threads as this login node has cores, in jobs given fewer.
    threads_set = any(a.split("=")[0] in THREAD_OPTIONS for a in extra)
    if not threads_set:
        app_argv += ["--omp-nthreads", str(cpus_per_task(args.sbatch_args))]
    opts = build_parser().parse_args(app_argv)
    plan = check_inputs(opts, ["participant"])
    wf = participant_workflow(opts, plan)
    wf.base_dir = os.path.abspath(args.work_dir)
    if args.gpu_sbatch_args:
        score = wf.get_node("score")
        score_args = f"{args.sbatch_args} {args.gpu_sbatch_args}"
        score.plugin_args = {"sbatch_args": score_args, "overwrite": True}
        if not threads_set:
            score.n_procs = score.inputs.num_threads = cpus_per_task(score_args)
    plugin_args = {"sbatch_args": args.sbatch_args, "max_jobs": args.max_jobs}
    return wf, plugin_args, plan, args.dry_run


def main(argv=None) -> int:
    from nipype.pipeline.plugins import SLURMPlugin

    from normdiff_bids.errors import NormdiffError

    try:
        wf, plugin_args, plan, dry_run = build(argv)
    except NormdiffError as exc:
        print(f"nipype_slurm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    SLURMPlugin(plugin_args=plugin_args)  # the plugin accepts these arguments
    nodes = wf.list_node_names()
    print(f"{len(nodes)} SLURM jobs for {len(plan.rows)} participant/session rows "
          f"(sbatch {plugin_args['sbatch_args']}):")
    for node in nodes:
        print(f"  {node}")
    if dry_run:
        return 0
    from normdiff_bids.data.bids import find_freesurfer_dir
    from normdiff_bids.outputs.dataset import prepare_output_dir

    prepare_output_dir(plan.output_dir, plan.bids_dir, fs_dir=find_freesurfer_dir(plan.bids_dir, plan.fs_dir))
    # The plugin names each job after $LOGNAME, which batch jobs, containers and cron often lack.
    os.environ.setdefault("LOGNAME", getpass.getuser())
    wf.run(plugin="SLURM", plugin_args=plugin_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
