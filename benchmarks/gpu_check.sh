#!/usr/bin/env bash
# The GPU check of featcache (benchmarks/gpu_check.py): extraction vs the bare bf16 teacher forward, cached vs
# online-teacher vs plain-CE training, the read path vs what a step consumes, and where a step's time goes.
#
#   bash benchmarks/gpu_check.sh [OUT]        full size on one GPU: 224 px, deit3_small + deit3_base teachers,
#                                             deit_tiny student, bf16; sized to finish in about 8 minutes on one
#                                             H100/H200-class GPU with 16 CPU cores
#   bash benchmarks/gpu_check.sh cpu [OUT]    tiny sizes on the CPU (32 px, 3-block teachers and student): checks
#                                             the script end to end; its numbers say nothing about a GPU
#
# Everything is random init (nothing is downloaded); images are synthetic JPEGs written under OUT. Run it from the
# repository root; it prints the report and writes OUT/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if [[ "${1:-}" == "cpu" ]]; then
  OUT=${2:-gpu_check_cpu}
  exec "$PYTHON" benchmarks/gpu_check.py --out "$OUT" --device cpu --teachers deit3_small,deit3_base \
    --teacher-kwargs '{"depth": 3}' --student-kwargs '{"depth": 3}' --img-size 32 --images 24 --views 2 \
    --batch-size 8 --steps 2 --workers 0
fi
OUT=${1:-gpu_check}
WORKERS=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))  # decode workers; two cores stay for the main process and writer
exec "$PYTHON" benchmarks/gpu_check.py --out "$OUT" --device cuda --teachers deit3_small,deit3_base \
  --img-size 224 --images 4096 --views 2 --batch-size 256 --steps 40 --workers "$WORKERS"
