#!/usr/bin/env bash
# Runs every fuzz target in turn for SECONDS each (default 600), one at a time and niced,
# and prints each target's last libFuzzer status line (`#N ... exec/s`) and any crash.
#   fuzz/run-all.sh [SECONDS] [TARGET...]
set -eu
cd "$(dirname "$0")"
secs=${1:-600}
shift || true
targets=${*:-"tokenizer_json data_formats llama2c safetensors_header config_toml"}
[ -d corpus ] || ./seed-corpora.sh
mkdir -p logs
for t in $targets; do
  mkdir -p "corpus/$t" "artifacts/$t"
  echo "== $t: ${secs}s"
  # A crash or timeout stops the target; its input lands in artifacts/TARGET/.
  nice -n 19 cargo +nightly fuzz run -s none -a "$t" "corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -max_len=65536 \
      -artifact_prefix="artifacts/$t/" > "logs/$t.log" 2>&1 || echo "   $t stopped with status $?"
  grep -E '^#[0-9]+' "logs/$t.log" | tail -n 1 || true
  ls "artifacts/$t" 2>/dev/null | sed 's/^/   artifact: /'
done
