#!/usr/bin/env bash
# One node of a SLURM job: torchrun "$@" with an exit status SLURM can trust.
#
# On preemption, scancel or the time limit SLURM sends SIGTERM to every process of the step,
# torchrun included. The training ranks (--exit-signal-handler) agree, save and exit 0, but
# torchrun turns its own SIGTERM into SignalException and exits 1, so SLURM would record FAILED.
# Here torchrun runs in the background; a SIGTERM is forwarded to the ranks (in case SLURM's did
# not reach them), and once torchrun is done the node's status is the ranks' own: 0 when every
# local rank reported a clean exit (pretrain_spiral.py writes SPIRAL_EXIT_STATUS_DIR/rank<N>),
# torchrun's status otherwise.
set -uo pipefail
REPO="${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
TORCHRUN="${TORCHRUN:-$REPO/.venv/bin/torchrun}"
nproc="${NPROC_PER_NODE:?NPROC_PER_NODE (processes on this node) is required}"
status_dir=$(mktemp -d "${TMPDIR:-/tmp}/spiral_exit.XXXXXX")
trap 'rm -rf "$status_dir"' EXIT
export SPIRAL_EXIT_STATUS_DIR="$status_dir"

got_signal=""
forward() {
  got_signal="$1"
  # The ranks are torchrun's children; torchrun itself handles its own copy.
  pkill "-$1" -P "$torchrun_pid" 2>/dev/null || true
}
"$TORCHRUN" "$@" &
torchrun_pid=$!
trap 'forward TERM' TERM
trap 'forward INT' INT

status=0
while :; do
  wait "$torchrun_pid"; status=$?
  # wait returns early (status > 128) when a trapped signal arrives; torchrun may still run.
  kill -0 "$torchrun_pid" 2>/dev/null || break
done

if [ "$status" -ne 0 ] && [ -n "$got_signal" ]; then
  clean=$(grep -lx 0 "$status_dir"/rank* 2>/dev/null | wc -l)
  if [ "$clean" -eq "$nproc" ]; then
    echo "launch_node.sh: torchrun exited $status after SIG$got_signal, but all $nproc ranks saved and exited 0: exit 0" >&2
    status=0
  else
    echo "launch_node.sh: torchrun exited $status after SIG$got_signal; $clean of $nproc ranks exited cleanly" >&2
  fi
fi
exit "$status"
