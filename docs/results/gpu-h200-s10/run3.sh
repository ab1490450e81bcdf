#!/bin/bash
# Device checks of session 10, third run: torch.compile (inductor; and reduce-overhead, CUDA graphs)
# of the default bundle's scoring step on the GPU, where fixed per-call costs bound it.
export PYTHONUNBUFFERED=1
R=/tmp/res; mkdir -p $R
LOG=$OUT/log.txt
pack() { tar czf $OUT/results.tgz -C $R . 2>/dev/null; }
step() { echo "=== $(date +%T) $*" | tee -a $LOG; }
step install
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>$LOG 2>&1 || { echo "install failed" | tee -a $LOG; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
for b in 8 1; do
  step detect compile batch $b
  timeout 95 python3 -m benchmarks.detect --device cuda --models default --no-throughput --candidates compile-graphs,compile --precision-batch $b --precision-reps 3 --target-s 0.5 --pydicom-files 0 --out $R/detect-cuda-compile-b$b.json 2>&1 | grep -v "^WARNING:root" | grep -v "^ *$" | tail -20 | tee -a $LOG
  pack
done
step done
