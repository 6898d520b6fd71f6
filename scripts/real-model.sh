#!/usr/bin/env bash
# The real-model runs of the README ("A real model"): SmolLM2-135M-Instruct (GGUF) as a judge,
# preference augmentation on a 2% seed of HH, OSP against online and offline DPO at the same
# budget, and self-improvement on TL;DR with no human preferences. Each step writes into
# runs/real and is skipped when its output exists, so the script resumes where it stopped.
# Usage: bash scripts/real-model.sh   (OSP=path/to/osp to use another binary; STEPS="a b" runs
# only the named steps, in this file's order, e.g. STEPS="judge-train-seed2 export-seed2")
set -euo pipefail
cd "$(dirname "$0")/.."
OSP=${OSP:-target/release/osp}
[ -x "$OSP" ] || cargo build --release
G=../shared/data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
R=runs/real
D=$R/data
[ -f $D/hh_judge_eval.jsonl ] || python3 scripts/real_data.py $D
CHAT=(--set judge.chat=true)
SAMPLING=(--max-new-tokens 64 --stop $'\n\nHuman:')

# step NAME CMD...: runs CMD (stdout to $R/NAME.out, stderr to $R/NAME.err, wall time and
# peak memory appended) unless $R/NAME.done exists.
step() {
    local name=$1
    shift
    [ -f "$R/$name.done" ] && return 0
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then
        return 0
    fi
    echo "== $name: $*" >&2
    /usr/bin/time -f "wall %e s, peak RSS %M KB" -o "$R/$name.time" "$@" >"$R/$name.out" 2>"$R/$name.err"
    touch "$R/$name.done"
}

# resumable NAME OUT CMD...: `step`, with --resume when OUT already holds checkpoints (a run
# that was stopped part-way continues instead of starting again).
resumable() {
    local name=$1 out=$2
    shift 2
    if [ -d "$out/checkpoints" ]; then
        step "$name" "$@" --resume
    else
        step "$name" "$@"
    fi
}

judge() { # NAME DATA FORMAT [osp judge options]
    local name=$1 data=$2 format=$3
    shift 3
    step "$name" "$OSP" judge --data "$data" --format "$format" "${CHAT[@]}" --quiet --json \
        --verdicts "$R/$name.verdicts.jsonl" "$@"
}

# 1. The base model as a judge.
judge judge-base-helpful $D/hh_judge_eval.jsonl hh --model $G
judge judge-base-tldr $D/tldr_judge_eval.jsonl tldr --model $G

# 2. Preference augmentation on the 2% seed; the start of every later run is the merged model.
resumable judge-train-seed2 $R/judge-seed2 "$OSP" judge-train --config configs/real-judge.toml
step export-seed2 "$OSP" export --merge --force --model $G \
    --adapter $R/judge-seed2/adapter --out $R/aug-seed2
judge judge-aug-helpful $D/hh_judge_eval.jsonl hh --model $R/aug-seed2

# 3. OSP, online DPO and offline DPO from the augmented model, at the same budget; win rates
# on held-out prompts judged by the augmented model, frozen.
compare() { # NAME ADAPTER [options]
    local name=$1 adapter=$2
    shift 2
    step "$name" "$OSP" compare --model $R/aug-seed2 --adapter "$adapter" \
        --prompts $D/hh_prompts_eval.jsonl "${SAMPLING[@]}" "${CHAT[@]}" --json "$@"
}
resumable train-osp $R/osp "$OSP" train --config configs/real-osp.toml
compare compare-osp $R/osp/adapter
resumable train-online-dpo $R/online-dpo "$OSP" train --config configs/real-osp.toml --method online-dpo \
    --set train.out=\"$R/online-dpo\" --set pairing.k=2
compare compare-online-dpo $R/online-dpo/adapter
resumable train-dpo $R/dpo "$OSP" train --config configs/real-osp.toml --method dpo \
    --set train.out=\"$R/dpo\" --set data.preferences=\"$D/hh_seed2.jsonl\"
compare compare-dpo $R/dpo/adapter
judge judge-osp-helpful $D/hh_judge_eval.jsonl hh --model $R/aug-seed2 --adapter $R/osp/adapter

# 4. Self-improvement: OSP from the base model with no human preferences, on TL;DR posts;
# judged by the frozen base and by the augmented judge.
resumable train-self-improve $R/self-improve "$OSP" train --config configs/real-self-improve.toml
TLDR=(--model $G --adapter $R/self-improve/adapter --prompts $D/tldr_prompts_eval.jsonl
    --max-new-tokens 48 --stop $'\n' "${CHAT[@]}" --json)
step compare-self-base "$OSP" compare "${TLDR[@]}"
step compare-self-aug "$OSP" compare "${TLDR[@]}" --judge-adapter $R/judge-seed2/adapter

# 4b. The same on all 200 TL;DR posts (50 iterations of 4), the paper's prompt count.
resumable train-self-improve-200 $R/self-improve-200 "$OSP" train --config configs/real-self-improve.toml \
    --set train.steps=50 --set train.save_every=5 --set train.out=\"$R/self-improve-200\"
TLDR200=(--model $G --adapter $R/self-improve-200/adapter --prompts $D/tldr_prompts_eval.jsonl
    --max-new-tokens 48 --stop $'\n' "${CHAT[@]}" --json)
step compare-self200-base "$OSP" compare "${TLDR200[@]}"
step compare-self200-aug "$OSP" compare "${TLDR200[@]}" --judge-adapter $R/judge-seed2/adapter

# 5. Out of domain for the helpful seed: HH harmless-base, before and after augmentation.
judge judge-base-harmless $D/hh_harmless_eval.jsonl hh --model $G
judge judge-aug-harmless $D/hh_harmless_eval.jsonl hh --model $R/aug-seed2

# 6. A larger seed (10%).
resumable judge-train-seed10 $R/judge-seed10 "$OSP" judge-train --config configs/real-judge.toml \
    --set data.preferences=\"$D/hh_seed10.jsonl\" --set train.out=\"$R/judge-seed10\" \
    --set train.steps=118 --set train.save_every=20
step export-seed10 "$OSP" export --merge --force --model $G \
    --adapter $R/judge-seed10/adapter --out $R/aug-seed10
judge judge-aug10-helpful $D/hh_judge_eval.jsonl hh --model $R/aug-seed10
echo "all steps done; outputs in $R" >&2
