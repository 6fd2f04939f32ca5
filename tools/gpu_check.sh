#!/usr/bin/env bash
# The GPU path in one run, for a machine with a CUDA GPU and the project's dependencies
# importable by $PYTHON (default python3; `make setup` gives .venv/bin/python):
#
#   bash tools/gpu_check.sh OUTDIR
#
# 1. the test suite with its models on CUDA (TEST_DEVICE=cuda; projects.testing and the tools'
#    tiny config read it), pytest-xdist workers;
# 2. tools/amp_check.py: per method family, one SOLVER.AMP.ENABLED training iteration (finite
#    losses) and fp16-autocast inference against fp32;
# 3. train_net.py --num-gpus <GPUs on the machine> for 20 iterations of one tiny config per
#    method family, then --resume to 30 iterations;
# 4. (alone, after 1-3) tools/benchmark.py at 800x1333 (inference and training, equal-work report, FLOPs, peak GPU
#    memory) for every method against its reference.
# Every step has its own time limit (seconds, environment variables below) and log under
# OUTDIR; the summary (OUTDIR/summary.txt) has one line per step with its exit status.
set -u
OUT=${1:-output/gpu_check}
PY=${PYTHON:-python3}
SUITE_TIMEOUT=${SUITE_TIMEOUT:-300}
AMP_TIMEOUT=${AMP_TIMEOUT:-150}
LAUNCH_TIMEOUT=${LAUNCH_TIMEOUT:-150}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-240}
BENCH_EVAL=${BENCH_EVAL:-"--iters 10 --warmup 3 --flops"}
BENCH_TRAIN=${BENCH_TRAIN:-"--iters 5 --warmup 2"}
WORKERS=${WORKERS:-8}
STEPS=${STEPS:-"suite amp launch bench"}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

step() {  # step NAME TIMEOUT COMMAND...: run with a limit, log, record the exit status
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s: $*" | tee -a "$OUT/summary.txt"
}

{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, torchvision, detectron2; from detectron2 import _C; \
print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, 'detectron2', \
detectron2.__version__, 'compiled ops', not getattr(_C, 'IS_PURE_PYTHON_STANDIN', False))"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")

# The suite and the launch checks run in the background, beside the AMP check (they share the
# GPU; these steps check correctness only). The benchmark runs alone afterwards.
SUITE_PID=
case " $STEPS " in *" suite "*)
  TEST_DEVICE=cuda step suite "$SUITE_TIMEOUT" $PY -m pytest tests -q -ra -n "$WORKERS" \
    --dist loadfile -p no:cacheprovider --durations=15 &
  SUITE_PID=$! ;;
esac

LAUNCH_PID=
case " $STEPS " in *" launch "*)
  (for family in mask_rcnn dynamic_rcnn tsd_cascade decoupled_rcnn rdsnet; do
    opts=$($PY tools/amp_check.py --print-train-args "$family" --device "${TRAIN_DEVICE:-cuda}") \
      || continue
    eval "set -- $opts"
    step "launch_$family" "$LAUNCH_TIMEOUT" $PY train_net.py --num-gpus "$NGPU" "$@" \
      SOLVER.MAX_ITER 20 SOLVER.CHECKPOINT_PERIOD 10 OUTPUT_DIR "${RUNS_DIR:-$OUT}/launch/$family"
    step "resume_$family" "$LAUNCH_TIMEOUT" $PY train_net.py --num-gpus "$NGPU" --resume "$@" \
      SOLVER.MAX_ITER 30 SOLVER.CHECKPOINT_PERIOD 10 OUTPUT_DIR "${RUNS_DIR:-$OUT}/launch/$family"
    grep -h "Starting training from iteration\|bbox/AP\|Overall training speed" \
      "$OUT/resume_$family.log" | tail -n 3
  done) &
  LAUNCH_PID=$! ;;
esac

case " $STEPS " in *" amp "*)
  step amp "$AMP_TIMEOUT" $PY tools/amp_check.py --iters 150 --score 0.05 ${AMP_ARGS:-} --json "$OUT/amp.json" \
    --output "${RUNS_DIR:-$OUT}/amp_runs"
  tail -n 12 "$OUT/amp.log" ;;
esac

[ -n "$LAUNCH_PID" ] && wait "$LAUNCH_PID"
if [ -n "$SUITE_PID" ]; then
  wait "$SUITE_PID"
  grep -E "passed|failed" "$OUT/suite.log" | tail -n 3
  grep -E "^(FAILED|ERROR)" "$OUT/suite.log"
fi

case " $STEPS " in *" bench "*)
  C=configs
  for task in eval train; do
    if [ "$task" = eval ]; then args=$BENCH_EVAL; else args=$BENCH_TRAIN; fi
    B="$PY tools/benchmark.py --size 800 1333 $args --allow-unequal-work"
    step "bench_rcnn_$task" "$BENCH_TIMEOUT" $B --task "$task" --json "$OUT/bench_rcnn_$task.json" \
      --label faster_rcnn dynamic_rcnn tsd decoupled_rcnn --config-file \
      $C/baselines/faster_rcnn_R_50_FPN_1x.yaml $C/dynamic_rcnn/dynamic_rcnn_R_50_FPN_1x.yaml \
      $C/tsd/tsd_faster_rcnn_R_50_FPN_1x.yaml $C/decoupled_rcnn/decoupled_rcnn_R_50_FPN_2x.yaml
    step "bench_res2net_$task" "$BENCH_TIMEOUT" $B --task "$task" \
      --json "$OUT/bench_res2net_$task.json" --label mask_rcnn_R50 mask_rcnn_R2_50 \
      --config-file $C/baselines/mask_rcnn_R_50_FPN_1x.yaml \
      $C/res2net/mask_rcnn_R2_50_26w4s_FPN_2x.yaml
    step "bench_rdsnet_$task" "$BENCH_TIMEOUT" $B --task "$task" \
      --json "$OUT/bench_rdsnet_$task.json" --label retinanet rdsnet rdsnet_mbrm \
      --config-file $C/baselines/retinanet_R_50_FPN_1x.yaml $C/rdsnet/rdsnet_R_50_FPN_1x.yaml \
      $C/rdsnet/rdsnet_refine_R_50_FPN_1x.yaml
  done
  for f in "$OUT"/bench_*.log; do echo "== $f"; grep -v "Warning\|warn" "$f" | tail -n 12; done ;;
esac
cat "$OUT/summary.txt"
