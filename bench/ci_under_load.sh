#!/usr/bin/env bash
# Issue 13's check: run `.ci/run` N times in a row (default 5) in a fresh clone of this
# repository while a CPU-heavy process burns one of the machine's cores, and print each run's
# wall time and outcome. Stops at the first failure. Usage: bench/ci_under_load.sh [N] [CLONE_DIR]
set -euo pipefail
n="${1:-5}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
clone="${2:-$(mktemp -d)/gpuhop}"
if [ ! -d "$clone/.git" ]; then
  git clone -q "$repo" "$clone"
  # .ci/run expects ../shared beside the checkout, as CI has it
  [ -e "$clone/../shared" ] || ln -s "$repo/../shared" "$clone/../shared"
fi
python3 -c 'while 1: pass' &
burner=$!
trap 'kill $burner 2>/dev/null || true' EXIT
echo "clone: $clone; CPU burner pid $burner"
for i in $(seq 1 "$n"); do
  start=$(date +%s)
  if (cd "$clone" && CI=true bash .ci/run > "run-$i.log" 2>&1 </dev/null); then
    outcome="passed: $(grep -E '^[0-9]+ passed' "$clone/run-$i.log" | tail -1)"
  else
    outcome="FAILED (see $clone/run-$i.log)"
  fi
  echo "run $i: $(( $(date +%s) - start )) s, $outcome"
  case "$outcome" in FAILED*) exit 1 ;; esac
done
