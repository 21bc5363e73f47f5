#!/usr/bin/env bash
# Score participants in parallel on a SLURM cluster: one array task per participant, all against one
# model trained once by the group level. See workflows/README.md.
#
#   normdiff-bids "$BIDS_DIR" "$OUTPUT_DIR" group                       # once: trains OUTPUT_DIR/models/default
#   ls -d "$BIDS_DIR"/sub-* | xargs -n1 basename > participants.txt      # one label per line
#   sbatch --array=1-$(wc -l < participants.txt)%50 \
#          --export=ALL,BIDS_DIR=$BIDS_DIR,OUTPUT_DIR=$OUTPUT_DIR workflows/slurm_array.sh
#
# Every task writes only its own participant's files; the shared ones (dataset_description.json,
# .bidsignore) are merged under a file lock, so tasks can share OUTPUT_DIR. Each task gets its own Nipype
# work folder, so a failed task can be resubmitted alone (sbatch --array=17 ...) and resumes.
#
#SBATCH --job-name=normdiff-participant
#SBATCH --cpus-per-task=2
#SBATCH --mem=4G
#SBATCH --time=00:30:00
#SBATCH --output=normdiff-%A_%a.log
set -euo pipefail

: "${BIDS_DIR:?set BIDS_DIR to the raw BIDS dataset}"
: "${OUTPUT_DIR:?set OUTPUT_DIR to the derivatives folder the group level wrote}"
: "${SLURM_ARRAY_TASK_ID:?submit with sbatch --array=1-N (or set SLURM_ARRAY_TASK_ID to test)}"
PARTICIPANTS_FILE=${PARTICIPANTS_FILE:-participants.txt}
MODEL=${MODEL:-$OUTPUT_DIR/models/default}
WORK_ROOT=${WORK_ROOT:-${TMPDIR:-/tmp}/normdiff-work}
# The command to run: the installed tool, or the container, e.g. "apptainer run normdiff-bids.sif".
NORMDIFF_BIDS=${NORMDIFF_BIDS:-normdiff-bids}
EXTRA_ARGS=${EXTRA_ARGS:-}

label=$(sed -n "${SLURM_ARRAY_TASK_ID}p" "$PARTICIPANTS_FILE" | tr -d '[:space:]')
if [[ -z "$label" ]]; then
    echo "no participant on line ${SLURM_ARRAY_TASK_ID} of ${PARTICIPANTS_FILE}" >&2
    exit 2
fi
label=${label#sub-}

# One participant is a short chain of nodes: run them in order (--nprocs with one participant runs them in
# this process), and give torch the task's CPUs.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# shellcheck disable=SC2086  # EXTRA_ARGS holds several options on purpose
exec $NORMDIFF_BIDS "$BIDS_DIR" "$OUTPUT_DIR" participant \
    --participant-label "$label" \
    --model "$MODEL" \
    --work-dir "$WORK_ROOT/sub-$label" \
    --nprocs "$OMP_NUM_THREADS" \
    --quiet $EXTRA_ARGS
