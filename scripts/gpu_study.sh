#!/usr/bin/env bash
# Runs the fine-tuning study's `gpu` preset on a GPU machine whose calls are
# limited to minutes: `start` builds slattn and leaves the study running in its
# own session (extra arguments after SECONDS go to `slattn finetune`, e.g.
# --variants sla2-qat); `wait
# [SECONDS]` follows it until it ends or SECONDS pass (default 540), then copies
# whatever it has written, with its log, to $OUT (or ./gpu-logs).
# Usage: bash scripts/gpu_study.sh start [SECONDS [FINETUNE OPTIONS...]] | wait [SECONDS]
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS="${OUT:-gpu-logs}"
STUDY=/tmp/slattn-study
mkdir -p "$LOGS"

follow() {
  local limit=$1 start
  start=$(date +%s)
  while [ ! -f "$STUDY/out/results.json" ] && pgrep -f "slattn finetune --preset gpu" >/dev/null \
        && [ $(( $(date +%s) - start )) -lt "$limit" ]; do
    sleep 10
  done
  # Progress bars rewrite their line with carriage returns: keep the last state of each.
  tr '\r' '\n' <"$STUDY/log" | grep -v '^\s*$' | tail -30
  cp "$STUDY/log" "$LOGS/study.log"
  for f in results.json report.md loss_curves.png samples.png; do
    [ -f "$STUDY/out/$f" ] && cp "$STUDY/out/$f" "$LOGS/"
  done
  if [ -f "$STUDY/out/results.json" ]; then echo "== study finished"; else echo "== study still running"; fi
}

case "${1:-}" in
  start)
    bash scripts/gpu_check.sh build || exit 1
    mkdir -p "$STUDY"
    echo "== gpu preset, started $(date -u +%H:%M:%S)"
    setsid nohup slattn finetune --preset gpu --device cuda --out-dir "$STUDY/out" --cache-dir "$STUDY/cache" \
      "${@:3}" >"$STUDY/log" 2>&1 < /dev/null &
    follow "${2:-300}"
    ;;
  wait)
    follow "${2:-540}"
    ;;
  *)
    echo "usage: bash scripts/gpu_study.sh start [SECONDS] | wait [SECONDS]" >&2
    exit 2
    ;;
esac
