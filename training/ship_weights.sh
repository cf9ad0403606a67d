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
# WORK (default OUT_DIR/data) holds the phantoms, caches and logs.
set -euo pipefail
REPO=$(realpath "$(dirname "$0")/..")
# Every command runs from the repository, with its folders relative to it: the
# cards record the commands as run, and a machine's absolute paths mean nothing to a reader.
OUT_ARG=${1:?usage: ship_weights.sh OUT_DIR [TRAIN_MINUTES]}
OUT=$(realpath -m --relative-to="$REPO" "$OUT_ARG")
WORK=$(realpath -m --relative-to="$REPO" "${WORK:-$OUT_ARG/data}")
MINUTES=${2:-4.5}
PY=${PYTHON:-python3}
cd "$REPO"
mkdir -p "$OUT" "$WORK"
qid2() { "$PY" -m qid2_diffusers.cli "$@"; }
# One OpenMP thread per process: four runs x (main + loader workers) share
# the host's cores, and oversubscribed torch threads starved the GPU (4 steps/s).
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1

if [[ "${QID2_SHIP_SMOKE:-0}" == 1 ]]; then
  N_TRAIN=2; N_VAL=1; N_TEST=3; SLAB="--slab 3"; PRESET=tiny; TRAIN_ARGS=(--max_train_steps 4 --train_batch_size 4)
  SWEEP=(--sweep-steps 2); REF_STEPS=3; SWEEP_SLICES=1; BENCH_SIZE=(--shape 24 28 6); GPU=cpu
else
  N_TRAIN=24; N_VAL=2; N_TEST=3; SLAB=""; PRESET=small; TRAIN_ARGS=(--max_train_steps 200000 --train_batch_size 64 --allow_tf32)
  SWEEP=(--sweep-steps 1,2,5,10,20,50); REF_STEPS=1000; SWEEP_SLICES=4; BENCH_SIZE=(); GPU=cuda
fi
JOBS=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))

stamp() { echo "[$(date +%H:%M:%S)] $*"; }

# DEADLINE (seconds since the epoch) bounds the optional last step; PACK_DIR,
# if set, receives tarballs of the models and results as soon as each exists
# (a GPU lease can end before the script does).
DEADLINE=${DEADLINE:-$(( $(date +%s) + 86400 ))}
pack() { [[ -n "${PACK_DIR:-}" ]] && tar czf "$PACK_DIR/$1.tgz" -C "$OUT" --exclude='checkpoint-*' --exclude=cache \
    --exclude=logs --exclude=predictions "${@:2}" || true; }

stamp "phantoms: $N_TRAIN train, $N_VAL validation, $N_TEST test (2.5 mm)"
qid2 phantom --out "$WORK/train" --subjects "$N_TRAIN" --seed 1000 --jobs "$JOBS" --quiet $SLAB
qid2 phantom --out "$WORK/val" --subjects "$N_VAL" --seed 2000 --jobs "$JOBS" --quiet $SLAB
qid2 phantom --out "$WORK/test" --subjects "$N_TEST" --seed 3000 --jobs "$JOBS" --quiet $SLAB

# One cache for the four runs: build_cache lets concurrent builders agree.
common=(--data_dir "$WORK/train" --validation_data_dir "$WORK/val" --cache_dir "$WORK/cache" --preset "$PRESET" --learning_rate 2e-4
        --max_train_time_minutes "$MINUTES" "${TRAIN_ARGS[@]}" --dataloader_num_workers 3 --report_to tensorboard)
stamp "training 4 models side by side for $MINUTES min"
$PY training/train_qid2.py --config small "${common[@]}" --R 3 \
    --output_dir "$OUT/qid2-small-r3" > "$WORK/train-qid2-r3.log" 2>&1 &
$PY training/train_qid2.py --config small "${common[@]}" --R 6 \
    --output_dir "$OUT/qid2-small-r6" > "$WORK/train-qid2-r6.log" 2>&1 &
$PY training/train_gan.py --model cgan "${common[@]}" --R 3 \
    --output_dir "$OUT/cgan-small-r3" > "$WORK/train-cgan-r3.log" 2>&1 &
$PY training/train_gan.py --model qgan "${common[@]}" --R 3 \
    --output_dir "$OUT/qgan-small-r3" > "$WORK/train-qgan-r3.log" 2>&1 &
fail=0
for job in $(jobs -p); do wait "$job" || fail=1; done
tail -n 3 "$WORK"/train-*.log
(( fail == 0 )) || { stamp "a training run failed"; exit 1; }
pack models qid2-small-r3 qid2-small-r6 cgan-small-r3 qgan-small-r3

stamp "Table 1 benchmark on $N_TEST held-out subjects, and the sampler sweep"
# R = 3 and R = 6 as two processes: scoring is CPU-bound and the cores are there.
qid2 benchmark --data "$WORK/test" --subjects "$N_TEST" --methods qid2,cgan,qgan,interp,dti,sh4 --R 3 \
    --model "$OUT/qid2-small-r3" --cgan "$OUT/cgan-small-r3" --qgan "$OUT/qgan-small-r3" \
    --batch-size 512 --no-progress --out "$OUT/benchmark-r3" > "$WORK/benchmark-r3.log" 2>&1 &
bench3=$!
qid2 benchmark --data "$WORK/test" --subjects "$N_TEST" --methods qid2,interp --R 6 --model "$OUT/qid2-small-r6" \
    --batch-size 512 --no-progress --out "$OUT/benchmark-r6" > "$WORK/benchmark-r6.log" 2>&1 &
bench6=$!
# Few-step samplers against the paper's DDPM-1000, on a central slab of one subject.
qid2 benchmark --data "$WORK/test" --subjects 1 --methods qid2 --R 3 --model "$OUT/qid2-small-r3" \
    "${SWEEP[@]}" --sweep-schedulers ddim,dpm++,unipc --sweep-subjects 1 --sweep-slices $SWEEP_SLICES \
    --batch-size 512 --no-progress --out "$OUT/sweep" > "$WORK/sweep.log" 2>&1 || true
qid2 benchmark --data "$WORK/test" --subjects 1 --methods qid2 --R 3 --model "$OUT/qid2-small-r3" \
    --sweep-steps $REF_STEPS --sweep-schedulers ddpm --sweep-subjects 1 --sweep-slices $SWEEP_SLICES \
    --batch-size 512 --no-progress --out "$OUT/sweep-ddpm" > "$WORK/sweep-ddpm.log" 2>&1 || true
wait "$bench3" || true
wait "$bench6" || true
tail -n 30 "$WORK"/benchmark-r*.log "$WORK"/sweep*.log
# The speed issue's table and the default it implies (fewest passes within 5% of DDPM-1000's FA error).
$PY benchmarks/steps_table.py "$OUT/sweep" "$OUT/sweep-ddpm" --reference "ddpm:$REF_STEPS" > "$OUT/steps_table.md" || true
cat "$OUT/steps_table.md" || true
cp "$WORK"/*.log "$OUT/"
pack results benchmark-r3 benchmark-r6 sweep sweep-ddpm steps_table.md $(cd "$OUT" && ls *.log)

# Throughput last, alone on the GPU, with what time is left: speed does not
# depend on the weights (random paper-preset network), only on the step count.
left=$(( DEADLINE - $(date +%s) ))
if (( left > 30 )); then
  stamp "GPU throughput ($left s left)"
  # The shipped pipeline's sampler and steps (the package default).
  timeout $(( left < 150 ? left : 150 )) $PY benchmarks/bench_gpu_volume.py "${BENCH_SIZE[@]}" --device $GPU \
      --json "$OUT/gpu_volume.json" 2>&1 | tee "$OUT/gpu_volume.txt" || true
  left=$(( DEADLINE - $(date +%s) ))
  (( left > 15 )) && timeout $(( left < 60 ? left : 60 )) $PY benchmarks/bench_network.py --device $GPU --dtype bf16 \
      --batch 64 --repeats 5 --json "$OUT/network_gpu.json" 2>&1 | tee "$OUT/network_gpu.txt" || true
  [[ -n "${PACK_DIR:-}" ]] && cp "$OUT"/gpu_volume.* "$OUT"/network_gpu.* "$PACK_DIR/" 2>/dev/null || true
fi
stamp "done"
