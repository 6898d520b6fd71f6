#!/usr/bin/env bash
# Crash soak: the crash test (tests/crash.rs) with many kills per command. It SIGKILLs the
# real `osp` binary at seeded random moments (and while checkpoints and the final adapter
# are written) in sft, train --method osp, train --method dpo and judge-train, resumes each
# run until it finishes, and requires every finished run to equal an uninterrupted one.
#
#   scripts/crash-soak.sh [KILLS_PER_COMMAND] [SEED]     (defaults: 100, a random seed)
#
# 100 kills per command take a few minutes on 2 cores. A failure names the command, the
# file that differs and the kill tally; rerun with the printed seed to reproduce it.
set -euo pipefail
cd "$(dirname "$0")/.."
kills=${1:-100}
seed=${2:-$(( (RANDOM << 15) | RANDOM ))}
echo "crash soak: $kills kills per command, seed $seed"
OSP_CRASH_KILLS=$kills OSP_CRASH_SEED=$seed \
    nice cargo test --release --test crash -- --nocapture
