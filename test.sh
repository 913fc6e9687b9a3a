#!/bin/sh
# Evaluate a training run as the original's test.sh: sh test.sh RUN_DIR [extra `dida test` options]
# Config = RUN_DIR/<name>.json, checkpoint = RUN_DIR/latest.pth; colour predictions, results.json and
# the log pre_log.out go to RUN_DIR/preds/. Set PYTHON to choose the interpreter.
if [ $# -lt 1 ]; then
    echo "usage: sh test.sh RUN_DIR [dida test options]" >&2
    exit 2
fi
run_dir=$1
shift
# accept trailing slashes (but keep a bare "/")
while [ "${run_dir%/}" != "$run_dir" ] && [ "${run_dir%/}" != "" ]; do
    run_dir=${run_dir%/}
done
if [ ! -d "$run_dir" ]; then
    echo "test.sh: $run_dir: no such run directory" >&2
    exit 2
fi
mkdir -p "$run_dir/preds" || exit 1
log="$run_dir/preds/pre_log.out"
echo "evaluating $run_dir (log: $log)"
"${PYTHON:-python}" -m dida test "$run_dir" --show-dir "$run_dir/preds" --opacity 1 "$@" >"$log" 2>&1
status=$?
if [ $status -ne 0 ]; then
    echo "test.sh: dida test failed with exit code $status; last lines of $log:" >&2
    tail -n 5 "$log" >&2
    exit $status
fi
# the summary table, all of it: "Summary:" and the table lines that follow
awk '/^Summary:/ {p = 1; print; next} p && /^[+|]/ {print; next} p {exit}' "$log"
