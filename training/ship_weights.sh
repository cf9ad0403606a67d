#!/usr/bin/env bash
# Everything behind the shipped weights and the published figures, in one run:
# phantom cohorts (train / validation / held-out test), QID² at R = 3 and 6,
# cGAN and qGAN trained side by side, then the Table 1 benchmark, the
# sampler sweep and the GPU throughput benchmark. Run it on one GPU:
#
#   bash training/ship_weights.sh OUT_DIR [TRAIN_MINUTES]
#
# QID2_SHIP_SMOKE=1 runs the same steps at toy sizes on a CPU (a check of the
# script, not of the model). Each training run records its own command line
# in OUT_DIR/<model>/README.md (model card) and training_summary.json.
set -euo pipefail
OUT=$(realpath -m "${1:?usage: ship_weights.sh OUT_DIR [TRAIN_MINUTES]}")
MINUTES=${2:-4.5}
WORK=${WORK:-/tmp/qid2-ship}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [[ "${QID2_SHIP_SMOKE:-0}" == 1 ]]; then
  N_TRAIN=2; N_VAL=1; N_TEST=1; SLAB="--slab 4"; PRESET=tiny; STEPS_ARGS="--max_train_steps 6"
  SWEEP="--sweep-steps 2 --sweep-schedulers ddim,ddpm"; BENCH_SIZE=(--shape 24 28 6)
else
  N_TRAIN=24; N_VAL=2; N_TEST=3; SLAB=""; PRESET=small; STEPS_ARGS="--max_train_steps 200000"
  SWEEP="--sweep-steps 5,10,20,50 --sweep-schedulers ddim,dpm++,unipc,ddpm"; BENCH_SIZE=()
fi
JOBS=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))

stamp() { echo "[$(date +%H:%M:%S)] $*"; }

stamp "phantoms: $N_TRAIN train, $N_VAL validation, $N_TEST test (2.5 mm)"
qid2 phantom --out "$WORK/train" --subjects "$N_TRAIN" --seed 1000 --jobs "$JOBS" --quiet $SLAB
qid2 phantom --out "$WORK/val" --subjects "$N_VAL" --seed 2000 --jobs "$JOBS" --quiet $SLAB
qid2 phantom --out "$WORK/test" --subjects "$N_TEST" --seed 3000 --jobs "$JOBS" --quiet $SLAB

common=(--data_dir "$WORK/train" --validation_data_dir "$WORK/val" --preset "$PRESET"
        --max_train_time_minutes "$MINUTES" $STEPS_ARGS --dataloader_num_workers 3 --report_to tensorboard)
stamp "training 4 models side by side for $MINUTES min"
$PY training/train_qid2.py --config training/configs/small.yaml "${common[@]}" --R 3 \
    --output_dir "$OUT/qid2-small-r3" > "$WORK/train-qid2-r3.log" 2>&1 &
$PY training/train_qid2.py --config training/configs/small.yaml "${common[@]}" --R 6 \
    --output_dir "$OUT/qid2-small-r6" > "$WORK/train-qid2-r6.log" 2>&1 &
$PY training/train_gan.py --model cgan "${common[@]}" --R 3 \
    --output_dir "$OUT/cgan-small-r3" > "$WORK/train-cgan-r3.log" 2>&1 &
$PY training/train_gan.py --model qgan "${common[@]}" --R 3 \
    --output_dir "$OUT/qgan-small-r3" > "$WORK/train-qgan-r3.log" 2>&1 &
fail=0
for job in $(jobs -p); do wait "$job" || fail=1; done
tail -n 3 "$WORK"/train-*.log
(( fail == 0 )) || { stamp "a training run failed"; exit 1; }

stamp "GPU throughput (alone on the GPU, so its timings are clean)"
$PY benchmarks/bench_gpu_volume.py "${BENCH_SIZE[@]}" --json "$OUT/gpu_volume.json" 2>&1 | tee "$OUT/gpu_volume.txt" || true
$PY benchmarks/bench_network.py --device "$($PY -c 'import torch;print("cuda" if torch.cuda.is_available() else "cpu")')" \
    --dtype bf16 --batch 64 --repeats 5 --json "$OUT/network_gpu.json" 2>&1 | tee "$OUT/network_gpu.txt" || true

stamp "Table 1 benchmark on $N_TEST held-out subjects, and the sampler sweep"
qid2 benchmark --data "$WORK/test" --subjects "$N_TEST" --methods qid2,cgan,qgan,interp,dti,sh2,sh4,sh6 --R 3 6 \
    --model "$OUT/qid2-small-r3" "$OUT/qid2-small-r6" --cgan "$OUT/cgan-small-r3" none --qgan "$OUT/qgan-small-r3" none \
    --batch-size 512 --no-progress --out "$OUT/benchmark" > "$WORK/benchmark.log" 2>&1 &
bench=$!
qid2 benchmark --data "$WORK/test" --subjects "$N_TEST" --methods qid2 --R 3 --model "$OUT/qid2-small-r3" \
    $SWEEP --sweep-subjects 1 --sweep-slices 6 --batch-size 512 --no-progress --out "$OUT/sweep" > "$WORK/sweep.log" 2>&1 || true
wait "$bench" || true
tail -n 40 "$WORK/benchmark.log" "$WORK/sweep.log"
cp "$WORK"/*.log "$OUT/"
stamp "done"
