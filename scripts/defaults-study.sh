#!/usr/bin/env bash
# The defaults study's engine runs: writes every task of `tessera_mil::train::tasks` into
# DIR (default runs/study) and runs each with the `tessera` binary on train's defaults
# (nine pooling models x 3 seeds per task), then prints each task's results table.
# See docs/defaults-study.md. Needs `cargo build --release` first.
#   scripts/defaults-study.sh [DIR] [TASK ...]
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-runs/study}"
shift || true
cargo run --release -q -p tessera-mil --example make_study -- "$dir" "$@"
for exp in "$dir"/*/experiment.yaml; do
  task="$(basename "$(dirname "$exp")")"
  if [ "$#" -gt 0 ] && [[ ! " $* " == *" $task "* ]]; then continue; fi
  echo "== $task"
  ./target/release/tessera run "$exp" --quiet --jobs 1 | sed -n '/^| train.pooling/,/^$/p'
done
