#!/bin/bash
# Submit launchers/slurm/train.sbatch with the common knobs named; prints the job id.
#
# usage: launchers/slurm/submit.sh [--nodes N] [--gpus-per-node G] [--tasks-per-node T] [--cpus-per-task C]
#                                  [--time HH:MM:SS] [--partition P] [--job-name NAME] [--sbatch-arg ARG ...]
#                                  --config FILE [section.key=value ...]
#
# One task per GPU: --gpus-per-node G starts G tasks per node, each with one GPU of its own. --gpus-per-node 0 runs
# CPU ranks (--tasks-per-node of them, default 1). Everything from --config on goes to launchers/train.py.
set -euo pipefail
self=$(realpath -- "$0")  # before the cd: $0 may be relative to the caller's folder
cd "$(dirname "$self")/../.."
nodes=1; gpus=0; tasks=""; cpus=""; time_limit=""; partition=""; name="mmscale"; extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) nodes=$2; shift 2 ;;
        --gpus-per-node) gpus=$2; shift 2 ;;
        --tasks-per-node) tasks=$2; shift 2 ;;
        --cpus-per-task) cpus=$2; shift 2 ;;
        --time) time_limit=$2; shift 2 ;;
        --partition) partition=$2; shift 2 ;;
        --job-name) name=$2; shift 2 ;;
        --sbatch-arg) extra+=("$2"); shift 2 ;;
        --config) break ;;
        -h|--help) sed -n '2,9p' "$self" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "submit.sh: unknown option $1 (options come before --config; see --help)" >&2; exit 2 ;;
    esac
done
if [ "${1:-}" != "--config" ]; then
    echo "submit.sh: give --config FILE (and overrides after it)" >&2; exit 2
fi
if [ "$gpus" -gt 0 ]; then
    args=(--ntasks-per-node "${tasks:-$gpus}" --gpus-per-node "$gpus")
else
    args=(--ntasks-per-node "${tasks:-1}")
fi
[ -n "$cpus" ] && args+=(--cpus-per-task "$cpus")
[ -n "$time_limit" ] && args+=(--time "$time_limit")
[ -n "$partition" ] && args+=(--partition "$partition")
exec sbatch --parsable --job-name "$name" --nodes "$nodes" "${args[@]}" "${extra[@]}" launchers/slurm/train.sbatch "$@"
