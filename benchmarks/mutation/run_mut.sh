#!/bin/bash
# usage: run_mut.sh TREE MODULE_PATH "pytest args"   (mutmut 2.5.1, one mutant at a time)
# mutmut 2 counts only exit code 1 as "killed"; pytest's exit code 2 (a mutant that breaks the
# import: syntax error, error at import time) would count as "survived", so any failure → 1.
# TREE is a copy of the repository (mutmut 2 edits the source files in place while it runs);
# the repository's own .venv is used. Logs go to $LOGS.
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LOGS=${LOGS:-/tmp/clipsam-mutmut-logs}; mkdir -p "$LOGS"
cd "$1" || exit 1
. "$ROOT/.venv/bin/activate"
export PYTHONPATH="$PWD"   # import this tree's clipsam_jax, not the editable install's
mod="$2"; tests="$3"
name=$(basename "$1")_$(echo "$mod" | tr '/' '_')
echo "=== $1 $mod | $tests | start $(date -u +%T)" >> $LOGS/timeline.txt
[ -f .mutmut-cache ] && sqlite3 -cmd ".timeout 10000" .mutmut-cache "delete from MiscData where key='baseline_time_elapsed'"  # time this module's own tests: timeout = 10 x that
nice -n 15 mutmut run --paths-to-mutate "$mod" --tests-dir tests/ --no-progress --simple-output \
  --runner "bash -c \"python -m pytest -x -q -p no:cacheprovider $tests || exit 1\"" \
  > $LOGS/$name.log 2>&1
echo "=== $mod rc=$? end $(date -u +%T)" >> $LOGS/timeline.txt
