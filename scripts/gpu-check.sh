#!/usr/bin/env bash
# The GPU check: run on a machine with an NVIDIA GPU, from the repository root, with gpu/ as
# staged by scripts/cuda-build.sh (the machine needs no Rust and no network). It prints one
# table: the CUDA tests (tests/cuda.rs: fixture logits to 1e-3, custom-op and whole-model
# gradients against the CPU, a LoRA preference step, cached decoding, stories260K), `osp
# bench` on the SmolLM2-135M shape and the d=512 model, and a short `osp train --method osp`
# on the real SmolLM2-135M-Instruct GGUF.
#
# The GGUF (94 MB) is over the device tool's 64 MiB a call, so it travels in two halves:
# gpu-gguf-1/ in a first call, gpu-gguf-2/ in the second (a warm machine keeps the first);
# this script joins them and checks the sha256. Without both halves (or $OSP_GGUF) the
# training row says it was skipped.
#
#   scripts/gpu-check.sh                          everything
#   OSP_GPU_CHECK_QUICK=1 scripts/gpu-check.sh    tests and one small bench row only
# A dry run of the script itself on a machine without a GPU, with binaries of a CPU build in
# a folder laid out like gpu/: OSP_GPU_DIR=that-folder OSP_GPU_CHECK_DEVICE=cpu.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
work=${OSP_GPU_WORK:-${TMPDIR:-/tmp}/osp-gpu-check}
staged=${OSP_GPU_DIR:-gpu}
device=${OSP_GPU_CHECK_DEVICE:-cuda}
rm -rf "$work"
mkdir -p "$work"
rows=()
row() { rows+=("| $1 | $2 | $3 |"); }
say() { printf '[gpu-check] %s\n' "$*" >&2; }
print_table() {
  echo
  echo "| check | result | detail |"
  echo "| --- | --- | --- |"
  printf '%s\n' "${rows[@]}"
}
trap print_table EXIT

# ---------------------------------------------------------------- the machine
if command -v nvidia-smi >/dev/null; then
  gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n1)
  row "GPU" "found" "$gpu"
else
  row "GPU" "no nvidia-smi" "continuing; the tests say whether CUDA answers"
fi

# ---------------------------------------------------------------- the binaries
unpack() {
  local name=$1
  if [[ -f $staged/$name.xz ]]; then
    if command -v xz >/dev/null; then
      xz -dc "$staged/$name.xz" >"$work/$name"
    else
      python3 -c 'import lzma,sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' \
        "$staged/$name.xz" >"$work/$name"
    fi
  elif [[ -f $staged/$name ]]; then
    cp "$staged/$name" "$work/$name"
  else
    return 1
  fi
  chmod +x "$work/$name"
}
for name in osp cuda-tests; do
  if ! unpack "$name"; then
    row "binaries" "MISSING" "$staged/$name(.xz) is absent: run scripts/cuda-build.sh and carry gpu"
    exit 1
  fi
done

# The binary links libcuda.so.1 (the driver) and CUDA 13's cuBLAS, cuBLASLt, cuRAND and
# runtime. The driver is on the loader's path; the libraries may sit in a toolkit or in a
# Python environment's nvidia wheels, so every folder holding one goes on LD_LIBRARY_PATH.
lib_dirs=""
for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13; do
  ldconfig -p 2>/dev/null | grep -q "$lib" && continue
  dir=$(find /usr/local /opt /usr/lib /usr/lib64 /root -name "$lib" -print -quit 2>/dev/null |
    xargs -r dirname)
  [[ -n $dir && ":$lib_dirs:" != *":$dir:"* ]] && lib_dirs=${lib_dirs:+$lib_dirs:}$dir
done
export LD_LIBRARY_PATH=${lib_dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
missing=$(ldd "$work/osp" | grep "not found" | awk '{print $1}' | tr '\n' ' ')
if [[ -n $missing ]]; then
  row "libraries" "MISSING" "$missing(searched /usr/local /opt /usr/lib /root)"
  exit 1
fi
row "libraries" "ok" "osp $(du -h "$work/osp" | cut -f1); LD_LIBRARY_PATH=${lib_dirs:-(system)}"

# ---------------------------------------------------------------- tests
say "running the CUDA tests"
export OSP_REPO=$repo OSP_DATA=$repo/$staged/data
if [[ $device == cuda ]]; then
  export OSP_REQUIRE_CUDA=1
else
  export OSP_TEST_DEVICE=cpu
fi
tests_log=$work/tests.log
start=$(date +%s)
timeout 600 "$work/cuda-tests" --test-threads=1 >"$tests_log" 2>&1
tests_rc=$?
tests_s=$(($(date +%s) - start))
cat "$tests_log" >&2
while read -r _ name _ result; do
  [[ -n $name ]] || continue
  detail=""
  if [[ $result != ok ]]; then
    # The line after "panicked at file:line:" is the assertion's message.
    detail=$(awk -v n="---- $name " 'index($0, n) == 1 { f = 1; next }
      f && /panicked/ { getline; print; exit }' "$tests_log" | cut -c1-160 | tr '|' '/')
  fi
  row "test $name" "$result" "$detail"
done < <(grep -E '^test [a-z0-9_]+ \.\.\. ' "$tests_log")
row "CUDA tests" "$([[ $tests_rc == 0 ]] && echo ok || echo "FAILED (rc $tests_rc)")" \
  "$(grep -m1 '^test result' "$tests_log") ${tests_s}s"

# ---------------------------------------------------------------- benchmark
bench() {
  local label=$1
  shift
  say "bench $label: osp bench $*"
  local out
  if out=$(timeout 300 "$work/osp" bench --device "$device" "$@" 2>&1); then
    while IFS= read -r line; do
      # | device | shape | parameters | batch | sampling | greedy | LoRA step |
      IFS='|' read -r _ _ shape params batch samp greedy step _ <<<"$line"
      row "bench $label:$(echo "$shape" | xargs)" "ok" \
        "$(echo "$params" | xargs) params, batch $(echo "$batch" | xargs): sampling $(echo "$samp" | xargs) tok/s, greedy $(echo "$greedy" | xargs) tok/s, LoRA step $(echo "$step" | xargs)"
    done < <(grep -E "^\\| $device" <<<"$out")
  else
    row "bench $label" "FAILED" "$(tail -n1 <<<"$out" | cut -c1-200 | tr '|' '/')"
  fi
}
if [[ ${OSP_GPU_CHECK_QUICK:-0} == 1 ]]; then
  bench "quick" --shape d512 --repeats 1
else
  bench "b8" --shape smollm2-135m --shape d512 --batch 8 --seq 128 --new-tokens 64
  bench "b64" --shape smollm2-135m --batch 64 --seq 128 --new-tokens 64
fi

# ---------------------------------------------------------------- osp train on the GGUF
gguf=${OSP_GGUF:-}
if [[ -z $gguf && -f gpu-gguf-1/part && -f gpu-gguf-2/part ]]; then
  gguf=$work/SmolLM2-135M-Instruct.Q4_1.gguf
  cat gpu-gguf-1/part gpu-gguf-2/part >"$gguf"
  if [[ -f $staged/gguf.sha256 ]] &&
    [[ $(sha256sum "$gguf" | cut -d' ' -f1) != $(cut -d' ' -f1 "$staged/gguf.sha256") ]]; then
    row "train osp (GGUF)" "FAILED" "the joined GGUF does not match gpu/gguf.sha256"
    exit 1
  fi
fi
if [[ -z $gguf ]]; then
  row "train osp (GGUF)" "skipped" "no GGUF: carry gpu-gguf-1 in one call and gpu-gguf-2 in the next, or set OSP_GGUF"
  exit "$tests_rc"
fi
if ! "$work/osp" inspect --model "$gguf" --device "$device" >"$work/inspect.log" 2>&1; then
  row "train osp (GGUF)" "skipped" "this osp cannot load the GGUF: $(tail -n1 "$work/inspect.log" | cut -c1-150 | tr '|' '/')"
  exit "$tests_rc"
fi
prompts=$work/prompts.jsonl
for p in "Give me three tips for sleeping better." "What is the capital of France?" \
  "Write a haiku about the sea." "Explain what a prime number is." \
  "How do I boil an egg?" "Name two planets larger than Earth." \
  "Suggest a name for a pet turtle." "Why is the sky blue?"; do
  printf '{"prompt": "%s"}\n' "$p"
done >"$prompts"
cat >"$work/train.toml" <<EOF
method = "osp"
[model]
path = "$gguf"
device = "$device"
[train]
steps = 3
batch_size = 4
eval_every = 0
save_every = 0
out = "$work/run"
[pairing]
k = 4
[sampling]
max_new_tokens = 48
[data]
prompts = "$prompts"
eval_fraction = 0.0
EOF
say "osp train --method osp on $gguf"
start=$(date +%s)
if timeout 420 "$work/osp" train --config "$work/train.toml" --method osp >"$work/train.log" 2>&1; then
  secs=$(($(date +%s) - start))
  last=$(tail -n1 "$work/run/metrics.jsonl" 2>/dev/null)
  pick() { grep -o "\"$1\":[^,}]*" <<<"$last" | head -n1 | cut -d: -f2; }
  row "train osp (GGUF)" "ok" "3 steps in ${secs}s; last step: loss $(pick loss), judge strength $(pick judge/strength_mean), sampling $(pick speed/sampling_tokens_per_s) tok/s, training $(pick speed/training_tokens_per_s) tok/s"
else
  rc=$?
  cat "$work/train.log" >&2
  row "train osp (GGUF)" "FAILED (rc $rc)" "$(tail -n1 "$work/train.log" | cut -c1-200 | tr '|' '/')"
  exit 1
fi
exit "$tests_rc"
