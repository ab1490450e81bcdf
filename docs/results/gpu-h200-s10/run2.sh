#!/bin/bash
# Device checks of session 10, second run: the folded-stem fix on CUDA, the default bundle on the GPU
# (throughput, precisions, accuracy), and the pipeline with 8 workers and 8 decoding processes.
export PYTHONUNBUFFERED=1
R=/tmp/res; mkdir -p $R
LOG=$OUT/log.txt
pack() { tar czf $OUT/results.tgz -C $R . 2>/dev/null; }
step() { echo "=== $(date +%T) $*" | tee -a $LOG; }
step install
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>$LOG 2>&1 || { echo "install failed" | tee -a $LOG; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
(python3 -m benchmarks.generate --out /tmp/acc --seed 3 --per-modality 40 --generators gan,vae --holdout none --no-pydicom --quiet > $R/generate.log 2>&1) &
GEN=$!
step pytest-cuda
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs -W ignore::UserWarning tests/detector/test_bundle.py -k "cuda or moves_with" tests/detector/test_learning.py::test_training_on_cuda tests/detector/test_model.py::test_the_folded_stem_moves_with_the_model 2>&1 | tail -15 | tee -a $LOG
wait $GEN; step generated; cat $R/generate.log >> $LOG
step detect
timeout 170 python3 -m benchmarks.detect --device cuda --models vit-b-16,default --batches 1,8,32,128 --reps 3 --target-s 0.5 --candidates bf16,bf16-autocast,tf32 --precision-batch 32 --accuracy-data /tmp/acc --pydicom-files 40 --out $R/detect-cuda.json 2>&1 | grep -v "^WARNING:root" | tee -a $LOG
pack
step score_pipeline workers 8 decode 8
timeout 110 python3 -m benchmarks.score_pipeline --device cuda --bundle vit-b-16 --batch-size 32 --count 2000 --reps 2 --workers 8 --decode-processes 8 --out $R/score-cuda-w8-d8.json 2>&1 | grep -v "^WARNING:root" | tee -a $LOG
pack; step done
