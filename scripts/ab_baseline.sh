#!/usr/bin/env bash
# Writes the tree of commit REV to ab-baseline/ (ignored by git), for
# `gpu_check.sh ab`, which measures this tree against it on one GPU machine
# session; carry ab-baseline to the GPU machine.
# Usage: bash scripts/ab_baseline.sh REV
set -euo pipefail
cd "$(dirname "$0")/.."
rev="${1:?usage: bash scripts/ab_baseline.sh REV}"
rm -rf ab-baseline
mkdir ab-baseline
git archive "$rev" | tar -x -C ab-baseline
git rev-parse --short "$rev" > ab-baseline/REV
echo "ab-baseline/ holds $(cat ab-baseline/REV)"
