#!/bin/sh
# Seed-compatible launcher: sh run_exp.sh EXPID GPUID [extra `dida train` arguments]
# Trains experiment EXPID (see `dida experiments`) on GPU GPUID; the log goes to run_exp_EXPID.out.
# Set PYTHON to choose the interpreter.
if [ "$#" -lt 2 ]; then
    echo "usage: sh run_exp.sh EXPID GPUID [--set key=value ...]" >&2
    exit 2
fi
EXPID=$1
GPUID=$2
shift 2
CUDA_VISIBLE_DEVICES=$GPUID
export CUDA_VISIBLE_DEVICES
echo "training experiment $EXPID on GPU $GPUID; log: run_exp_$EXPID.out"
"${PYTHON:-python}" -m dida train --exp "$EXPID" "$@" > "run_exp_$EXPID.out" 2>&1
rc=$?
tail -n 5 "run_exp_$EXPID.out"
exit $rc
