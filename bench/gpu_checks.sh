#!/usr/bin/env bash
# The GPU paths in one prepared run (none of them can run on the 2-core CPU machine): bf16 autocast training of
# both stages, NCCL under torchrun (start-up, DDP and a resumed run; the reductions need 2+ GPUs, see 2.), the
# KV-cache sampler, evaluation, throughput against fp32 and torch.compile against eager, each step time-limited,
# every result a line of the summary.
#
#   bash bench/gpu_checks.sh RESULTS_DIR     # on the GPU machine, from the repository root (a few minutes on an H200)
#   QUICK=1 LOW_PRECISION=fp32 bash bench/gpu_checks.sh /tmp/gc   # a few steps each: checks the script on a CPU
#   DEADLINE=420 bash bench/gpu_checks.sh "$OUT"   # no check runs past 420 s from the start (a device lease is short)
#   ONLY="1 4 7" bash bench/gpu_checks.sh "$OUT"    # some sections only
#
# RESULTS_DIR receives three files only (summary.txt, written as each check ends, env.txt and logs.tar.gz): the
# device tool brings back at most 8 files, so runs and logs live in WORK (default /tmp/gpu_checks_work).
# It needs only what pyproject.toml lists (torch, numpy, pillow, pyyaml, safetensors, tqdm, matplotlib) and reads
# the package from src/ (no install). Nothing is downloaded: LPIPS and rFID report "not computed" without weights.
set -u
RESULTS=${1:-${OUT:-/tmp/gpu_checks}}
OUT=${WORK:-/tmp/gpu_checks_work}
mkdir -p "$RESULTS" "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
VQ="$PY -m vqgan.cli"
RUNS="$OUT/runs"
if [ -n "${QUICK:-}" ]; then STEPS=6; BIG_STEPS=4; BIG_RES=64; PRIOR_STEPS=6; LOG=2
else STEPS=${STEPS:-300}; BIG_STEPS=${BIG_STEPS:-60}; BIG_RES=256; PRIOR_STEPS=${PRIOR_STEPS:-300}; LOG=20; fi
LOW=${LOW_PRECISION:-bf16}  # the mixed precision checked (fp32 for a dry run on a CPU, where bf16 crawls)
SUMMARY="$RESULTS/summary.txt"
: > "$SUMMARY"

ONLY=${ONLY:-1 2 3 4 5 6 7}  # the numbered sections to run (4 needs 1's model, 3 too)
want() { case " $ONLY " in *" $1 "*) return 0;; *) return 1;; esac; }
DEADLINE=${DEADLINE:-0}  # seconds for the whole script (0: none); each check's limit is cut to what is left
check() {  # check NAME LIMIT_SECONDS COMMAND...: runs it, logs to OUT/NAME.log, one summary line
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  if [ "$DEADLINE" -gt 0 ]; then
    local left=$((DEADLINE - SECONDS))
    if [ $left -lt 10 ]; then printf '%-28s skip  out of time (DEADLINE=%ss)\n' "$name" "$DEADLINE" | tee -a "$SUMMARY"; return; fi
    [ $left -lt "$limit" ] && limit=$left
  fi
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-28s %-4s %5ds  %s\n' "$name" "$([ $rc = 0 ] && echo ok || echo FAIL)" $((SECONDS - t0)) \
    "$(grep -v '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-110)" | tee -a "$SUMMARY"
}

rate() {  # rate RUN_DIR: mean steps/s (tokenizer) or tokens/s (prior) after the first logged window (start-up)
  $PY - "$1" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/logs/metrics.jsonl") if '"train"' in l]
for key, unit in (("it_per_s", "it/s"), ("tokens_per_s", "tokens/s")):
    rates = [r[key] for r in rows[1:] if r.get(key)]
    if rates:
        print(f"{sum(rates) / len(rates):.2f} {unit}")
        break
else:
    print("no rate logged")
EOF
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())"
} | tee "$RESULTS/env.txt"

COMMON="data.path=builtin:scenes train.log_every=$LOG train.image_every=100000 train.ckpt_every=100000"
# 1. the tokenizer: bf16 autocast against fp32, same config and steps (the small preset at batch 32, then f16-1024 at 256 px)
if want 1; then
for run in mixed:$LOW fp32:fp32; do
  name=${run%%:*} p=${run#*:}
  check "tokenizer-small-$name" 150 $VQ train-tokenizer small-cpu $COMMON train.steps=$STEPS train.batch_size=32 \
    train.eval_every=$STEPS train.precision=$p train.out_dir="$RUNS/small-$name" --no-progress
  echo "  small-cpu $p: $(rate "$RUNS/small-$name")" | tee -a "$SUMMARY"
done
for run in mixed:$LOW fp32:fp32; do
  name=${run%%:*} p=${run#*:}
  check "tokenizer-f16-$name" 150 $VQ train-tokenizer f16-1024 $COMMON model.resolution=$BIG_RES train.steps=$BIG_STEPS \
    train.batch_size=8 train.eval_every=$BIG_STEPS loss.perceptual_weight=0 train.precision=$p \
    train.out_dir="$RUNS/f16-$name" --no-progress
  echo "  f16-1024 ${BIG_RES}px $p: $(rate "$RUNS/f16-$name")" | tee -a "$SUMMARY"
done
fi
# 2. NCCL: torchrun with one process per GPU: the process group, DDP, a resumed run. The EMA codebook's, the
#    entropy penalty's and eval's collectives run only with 2+ ranks (one rank skips them), and NCCL will not put
#    two ranks on one GPU: on a one-GPU machine this checks the NCCL start-up, not the reductions
if want 2; then
NPROC=$($PY -c "import torch; print(max(1, torch.cuda.device_count()))")
check "torchrun-nccl-ema" 120 $PY -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m vqgan.cli \
  train-tokenizer small-cpu-ema $COMMON train.steps=$STEPS train.eval_every=$STEPS train.out_dir="$RUNS/ddp" --no-progress
check "torchrun-nccl-resume" 90 $PY -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m vqgan.cli \
  train-tokenizer small-cpu-ema $COMMON train.steps=$((STEPS + 20)) train.eval_every=$STEPS train.out_dir="$RUNS/ddp" \
  --resume --no-progress
fi
# 3. evaluation on the GPU, single process and under torchrun (its sums and gathers over NCCL)
if want 3; then
check "eval" 90 $VQ eval "$RUNS/small-mixed/model" builtin:scenes --out "$OUT/eval1" --no-progress
check "eval-torchrun-nccl" 90 $PY -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m vqgan.cli \
  eval "$RUNS/small-mixed/model" builtin:scenes --out "$OUT/eval2" --no-progress
check "eval-same-numbers" 60 $PY -c "
import json, sys
a, b = (json.load(open(f'$OUT/{d}/summary.json'))['metrics'] for d in ('eval1', 'eval2'))
pairs = {k: (a[k], b[k]) for k in ('psnr', 'ssim') if isinstance(a[k], float)}
pairs['usage'] = (a['codebook']['usage'], b['codebook']['usage'])
print('single vs torchrun:', pairs); sys.exit(any(abs(x - y) > 1e-4 * max(1, abs(x)) for x, y in pairs.values()))"
fi
# 4. stage 2: tokenize on the GPU, train the prior in bf16, sample with the KV cache (cached == uncached is a CPU test)
if want 4; then
check "tokenize" 60 $VQ tokenize "$RUNS/small-mixed/model" builtin:scenes "$RUNS/tokens" --count 512 --no-progress
check "prior-$LOW" 120 $VQ train-transformer demo-prior data.tokens="$RUNS/tokens" train.steps=$PRIOR_STEPS \
  train.precision=$LOW train.log_every=$LOG train.eval_every=$PRIOR_STEPS train.ckpt_every=$PRIOR_STEPS train.out_dir="$RUNS/prior" --no-progress
echo "  prior $LOW: $(rate "$RUNS/prior")" | tee -a "$SUMMARY"
check "sample" 60 $VQ sample "$RUNS/prior" "$OUT/samples" --tokenizer "$RUNS/small-mixed/model" --n 16 --no-progress
fi
# 5. vqgan imagine on CUDA: its memory check (three trial steps fit a model of the peak; a request that cannot fit
#    is refused with the largest that fits) and a run, with the predicted and the measured peak. open_clip is an
#    extra (vqgan[clip]); random ViT-B-32 weights: this is about memory and the CUDA paths, not images
if want 5; then
if $PY -c "import open_clip, torch; assert torch.cuda.is_available()" 2>/dev/null; then
  $PY -c "import open_clip, torch; torch.save(open_clip.create_model('ViT-B-32', pretrained=None, force_quick_gelu=True).state_dict(), '$OUT/clip-random.bin')"
  IMAGINE="$VQ imagine $RUNS/small-mixed/model --prompt 'a red house' --clip-weights $OUT/clip-random.bin --clip-pretrained openai --no-progress"
  check "imagine-cuda" 180 bash -c "$IMAGINE --size 256 256 --cutn 32 --steps 20 --out $OUT/imagine && $PY -c \"
import json; r = json.load(open('$OUT/imagine/run.json'))
print('predicted %.2f GiB, measured peak %.2f GiB' % (r['predicted_gpu_bytes'] / 2**30, r['peak_gpu_bytes'] / 2**30))\""
  check "imagine-refuses-too-big" 120 bash -c "$IMAGINE --size 16384 16384 --cutn 512 --steps 1 --out $OUT/imagine-big; [ \$? = 2 ]"
else
  echo "imagine-cuda                 skipped: needs CUDA and open_clip (pip install open-clip-torch)" | tee -a "$SUMMARY"
fi
fi
# 6. where a step's time goes (bench/step_profile.py): wall, data wait, device busy, kernels, device-to-host copies
#    per step and the top kernels, cuDNN autotuning off / on / off / on, then channels-last; the small preset, f16-1024
#    and (with section 4's token store) the demo prior, in the mixed precision
if want 6; then
PROFILES=("small small-cpu train.batch_size=32"
          "f16 f16-1024 model.resolution=$BIG_RES train.batch_size=8 loss.perceptual_weight=0")
if [ -d "$RUNS/tokens" ]; then PROFILES+=("prior demo-prior data.tokens=$RUNS/tokens")
else echo "profile-prior                skip  needs section 4's token store" | tee -a "$SUMMARY"; fi
for run in "${PROFILES[@]}"; do
  set -- $run; name=$1; shift
  check "profile-$name" 200 $PY bench/step_profile.py "$@" train.precision=$LOW --cudnn-benchmark both --channels-last \
    $([ -n "${QUICK:-}" ] && echo "--steps 2 --warmup 1 --profiled 1")
  sed -n '/^== /,$p' "$OUT/profile-$name.log" | grep -v -e '^\s*$' -e USDT -e 'ERROR:' | sed 's/^/  /' | tee -a "$SUMMARY"
done
fi
# 7. torch.compile (train.compile=true) in the mixed precision, against the eager runs above (same config and steps);
#    last, so that a slow compile cannot starve the other checks. NO_COMPILE=1 skips it (CPU dry runs: minutes)
if want 7; then
if [ -z "${NO_COMPILE:-}" ]; then
  check "tokenizer-small-compiled" 240 $VQ train-tokenizer small-cpu $COMMON train.steps=$STEPS train.batch_size=32 \
    train.eval_every=$STEPS train.precision=$LOW train.compile=true train.out_dir="$RUNS/small-compiled" --no-progress
  echo "  small-cpu $LOW compiled: $(rate "$RUNS/small-compiled") (eager: $(rate "$RUNS/small-mixed"))" | tee -a "$SUMMARY"
  check "prior-compiled" 120 $VQ train-transformer demo-prior data.tokens="$RUNS/tokens" train.steps=$PRIOR_STEPS \
    train.precision=$LOW train.compile=true train.log_every=$LOG train.eval_every=$PRIOR_STEPS \
    train.ckpt_every=$PRIOR_STEPS train.out_dir="$RUNS/prior-compiled" --no-progress
  echo "  prior $LOW compiled: $(rate "$RUNS/prior-compiled") (eager: $(rate "$RUNS/prior"))" | tee -a "$SUMMARY"
fi
fi
# the text only (the runs' weights, token stores and the CLIP file would pass the device tool's 16 MiB a file)
(cd "$OUT" && find . -type f \( -name '*.log' -o -name '*.json' -o -name '*.jsonl' -o -name '*.yaml' -o -name '*.txt' \
  -o -name '*.html' \) -size -4M -print0 | tar -czf "$RESULTS/logs.tar.gz" --null -T -)
echo "summary: $SUMMARY"
cat "$SUMMARY"
