#!/bin/sh
# Seed-compatible launcher: sh run_config.sh GPUID [CONFIG] [extra `dida train` arguments]
# Trains CONFIG (a YAML/JSON config file; default: experiment 7's, `dida experiments --paths`)
# on GPU GPUID, e.g. sh run_config.sh 0 my.yaml --set train.max_iters=20000
# Set PYTHON to choose the interpreter.
if [ "$#" -lt 1 ]; then
    echo "usage: sh run_config.sh GPUID [CONFIG] [--set key=value ...]" >&2
    exit 2
fi
GPUID=$1
shift
CUDA_VISIBLE_DEVICES=$GPUID
export CUDA_VISIBLE_DEVICES
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    echo "training $1 on GPU $GPUID"
    CONFIG=$1
    shift
    exec "${PYTHON:-python}" -m dida train --config "$CONFIG" "$@"
fi
echo "training experiment 7 on GPU $GPUID"
exec "${PYTHON:-python}" -m dida train --exp 7 "$@"
