#!/usr/bin/env bash
# The retrain behind the shipped weights and the decision table, in one run,
# with the shipped recipe (BENCHMARK.md, model cards): domain-randomised
# phantoms, physics prior, b-value tokens, three shells; QID² at R = 3 and 6
# with the network chosen on short runs (--attention coarse), cGAN and qGAN
# with the same data and step plan, trained side by side; then the decision
# table's columns (held-out randomised and multi-tensor phantoms, the real
# crops) against MP-PCA + fit. On a lent GPU:
#
#   bash training/ship_weights.sh OUT_DIR [TRAIN_MINUTES] [TRAIN_STEPS]
#
# The GPU throughput benchmark runs first (a lease can end at any time): the
# retrain's network (random weights, --stand-in --attention coarse) and the
# shipped model on the HCP-grid subject. QID2_SHIP_SMOKE=1 runs every step at
# toy sizes on a CPU (a check of the script, not of the models). Each training
# run records its own command line in its model card (README.md) and
# training_summary.json. WORK (default OUT_DIR/data) holds the phantoms,
# caches and logs; PACK_DIR, if set, receives a tarball of each result as soon
# as it exists; DEADLINE (seconds since the epoch) bounds the benchmarks.
#
# Through the `device` tool (15 minutes of GPU in all, 10 per command): make
# the wheels here (`bash scripts/device_wheels.sh`), then one run with carry
# [".whl", "tests/data/real/mdt_b1k_b2k"] that starts the script detached and
# waits, so what is packed comes back even if the command hits its limit:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD DEADLINE=$(( $(date +%s) + 540 )) PACK_DIR=$OUT
#   setsid bash training/ship_weights.sh runs/ship 4 > $OUT/ship.log 2>&1 & sleep 560
set -euo pipefail
REPO=$(realpath "$(dirname "$0")/..")
# Every command runs from the repository, with its folders relative to it: the
# cards record the commands as run, and a machine's absolute paths mean nothing to a reader.
OUT_ARG=${1:?usage: ship_weights.sh OUT_DIR [TRAIN_MINUTES] [TRAIN_STEPS]}
OUT=$(realpath -m --relative-to="$REPO" "$OUT_ARG")
WORK=$(realpath -m --relative-to="$REPO" "${WORK:-$OUT_ARG/data}")
MINUTES=${2:-6}
STEPS=${3:-3000}
PY=${PYTHON:-python3}
cd "$REPO"
mkdir -p "$OUT" "$WORK"
qid2() { "$PY" -m qid2_diffusers.cli "$@"; }
# One OpenMP thread per process: four runs x (main + loader workers) share
# the host's cores, and oversubscribed torch threads starved the GPU (4 steps/s).
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1

if [[ "${QID2_SHIP_SMOKE:-0}" == 1 ]]; then
  N_TRAIN=2; N_TEST=2; SLAB=3; TEST_SLAB=3; PRESET=tiny; STEPS=4; CROP=16; BATCH=4; WORKERS=0; GPU=cpu
  BENCH_SIZE=(--resolution 5 --slab 3)
else
  N_TRAIN=24; N_TEST=3; SLAB=24; TEST_SLAB=8; PRESET=small; CROP=48; BATCH=16; WORKERS=3; GPU=cuda
  BENCH_SIZE=()
fi
JOBS=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
DEADLINE=${DEADLINE:-$(( $(date +%s) + 86400 ))}
stamp() { echo "[$(date +%H:%M:%S)] $*"; }
left() { echo $(( DEADLINE - $(date +%s) )); }
bounded() { timeout $(( $(left) > 60 ? $(left) : 60 )) "$@"; }  # a benchmark gets what is left of the lease, at least a minute
pack() { [[ -n "${PACK_DIR:-}" ]] && tar czf "$PACK_DIR/$1.tgz" -C "$OUT" --exclude='checkpoint-*' --exclude=data \
    --exclude='runs' "${@:2}" || true; }

stamp "GPU throughput first: the retrain's network and the shipped model, one HCP-grid subject each"
for model in "--stand-in --attention coarse --residual-weight 1:coarse-w1" "--residual-weight 1:shipped-w1" ":shipped-default"; do
  timeout 150 $PY benchmarks/bench_gpu_volume.py "${BENCH_SIZE[@]}" --device $GPU ${model%%:*} \
      --json "$OUT/throughput-${model##*:}.json" > "$OUT/throughput-${model##*:}.txt" 2>&1 || true
done
pack throughput $(cd "$OUT" && ls throughput-*)

stamp "phantoms: $N_TRAIN train, 2 validation, $N_TEST + $N_TEST held out (the data lines of the cards and BENCHMARK.md)"
qid2 phantom --out "$WORK/rnd-train" --subjects "$N_TRAIN" --seed 1000 --randomize --slab $SLAB --jobs "$JOBS" --quiet
qid2 phantom --out "$WORK/rnd-val" --subjects 2 --seed 2000 --randomize --slab $SLAB --jobs "$JOBS" --quiet
qid2 phantom --out "$WORK/rnd-test8" --subjects "$N_TEST" --seed 3000 --randomize --slab $TEST_SLAB --jobs "$JOBS" --quiet
qid2 phantom --out "$WORK/mt-test" --subjects "$N_TEST" --seed 3100 --simulator multitensor --shells 1000,2000,3000 \
    --slab $TEST_SLAB --jobs "$JOBS" --quiet

# The shipped recipe, with a step plan the cosine schedule decays over; the
# wall-time budget only guards the lease (the last checkpoint is kept).
recipe=(--data_dir "$WORK/rnd-train" --validation_data_dir "$WORK/rnd-val" --preset "$PRESET" --bval_conditioning
        --shells 1000,2000,3000 --n_acquired 30,10,20 --validation_n_acquired 30 --crop_size $CROP --train_batch_size $BATCH
        --learning_rate 2e-4 --lr_scheduler cosine --lr_warmup_steps 100 --max_train_steps "$STEPS"
        --max_train_time_minutes "$MINUTES" --validation_steps 1000 --validation_num_slices 2 --checkpointing_steps 500
        --dataloader_num_workers $WORKERS --report_to none
        --data_description "$N_TRAIN domain-randomised phantoms, \`qid2 phantom --out rnd-train --subjects $N_TRAIN --seed 1000 --randomize --slab $SLAB\` (validation: the same with --subjects 2 --seed 2000)")
qid2_recipe=(--config "$PRESET" --physics_prior --attention coarse --cache_dir "$WORK/cache" --timestep_bias_portion 0.75
             --validation_num_inference_steps 1 --inference_scheduler ddim)
gan_recipe=(--cache_dir "$WORK/cache-gan" --use_ema --ema_max_decay 0.999)
stamp "training 4 models side by side: $STEPS steps or $MINUTES min"
for R in 3 6; do
  $PY training/train_qid2.py "${qid2_recipe[@]}" "${recipe[@]}" --R $R --output_dir "$OUT/runs/qid2-r$R" \
      > "$WORK/train-qid2-r$R.log" 2>&1 &
done
for gan in cgan qgan; do
  $PY training/train_gan.py --model $gan "${gan_recipe[@]}" "${recipe[@]}" --R 3 --output_dir "$OUT/$gan-small-r3" \
      > "$WORK/train-$gan-r3.log" 2>&1 &
done
fail=0
for job in $(jobs -p); do wait "$job" || fail=1; done
tail -n 3 "$WORK"/train-*.log
(( fail == 0 )) || { stamp "a training run failed"; exit 1; }
# A run becomes a shipped model by being re-saved in fp16 with the defaults
# (test-time adaptation off) and scored on the validation subjects.
for R in 3 6; do
  $PY training/average_weights.py --inputs "$OUT/runs/qid2-r$R" --output_dir "$OUT/qid2-small-r$R" \
      --validation_data_dir "$WORK/rnd-val" --cache_dir "$WORK/cache" --shells 1000,2000,3000 --n_acquired 30 \
      --default_adapt_steps 0 > "$WORK/export-qid2-r$R.log" 2>&1
  cp "$OUT/runs/qid2-r$R/README.md" "$OUT/runs/qid2-r$R/training_summary.json" "$OUT/qid2-small-r$R/"  # the run's card
done
pack models qid2-small-r3 qid2-small-r6 cgan-small-r3 qgan-small-r3

stamp "the decision table's columns ($(left) s left)"
# One process per column: scoring is CPU-bound, and the host's cores are there.
D="$OUT/decision"; mkdir -p "$D"
models=(--model "$OUT/qid2-small-r3" --cgan "$OUT/cgan-small-r3" --qgan "$OUT/qgan-small-r3")
methods=qid2,mppca+qid2,cgan,mppca+cgan,qgan,mppca+qgan,dti,mppca+dti,mppca+sh4
for b in 1000 2000; do for data in rnd-test8:rnd mt-test:mt; do
  bounded $PY -m qid2_diffusers.cli benchmark --no-progress --seed 0 --data "$WORK/${data%%:*}" --subjects "$N_TEST" --shell $b \
      --R 3 --adapt-steps 0 --methods $methods --residual-weight auto,1 "${models[@]}" --out "$D/${data##*:}-b$b" \
      > "$WORK/decision-${data##*:}-b$b.log" 2>&1 &
done; done
bounded $PY -m qid2_diffusers.cli benchmark --no-progress --seed 0 --real --R 3 --adapt-steps 0 --residual-weight auto,1 \
    --methods $methods,sh2,mppca+sh2 "${models[@]}" --out "$D/real" > "$WORK/decision-real.log" 2>&1 &
for b in 1000 2000; do
  bounded $PY -m qid2_diffusers.cli benchmark --no-progress --seed 0 --data "$WORK/rnd-test8" --subjects "$N_TEST" --shell $b \
      --R 6 --adapt-steps 0 --methods qid2,mppca+qid2,dti,mppca+dti --residual-weight auto,1 --model "$OUT/qid2-small-r6" \
      --out "$D/rnd-b$b-r6" > "$WORK/decision-rnd-b$b-r6.log" 2>&1 &
done
for job in $(jobs -p); do wait "$job" || true; done
args=(); for data in "rnd:randomised" "mt:multi-tensor"; do for b in 1000 2000; do
  [[ -f "$D/${data%%:*}-b$b/results.json" ]] && args+=("${data#*:} b=$b=$D/${data%%:*}-b$b")
  [[ -f "$D/${data%%:*}-b$b-r6/results.json" ]] && args+=("${data#*:} b=$b R=6=$D/${data%%:*}-b$b-r6")
done; done
real=(); [[ -f "$D/real/results.json" ]] && real=(--real "$D/real")
$PY benchmarks/decision_table.py --baseline mppca+dti --phantoms "${args[@]}" "${real[@]}" --out "$D/decision.md" || true

cp "$WORK"/*.log "$OUT/"
pack results decision $(cd "$OUT" && ls *.log)
stamp "done"
