#!/usr/bin/env bash
# Installs what the tests need, then runs the whole suite: the C++ tests
# (ctest) and the Python tests (pytest). Used as is by CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"

# GoogleTest for the C++ tests (preinstalled on the development image).
if [ ! -f /usr/include/gtest/gtest.h ] && command -v apt-get >/dev/null; then
  apt-get update -q && apt-get install -y -q libgtest-dev
fi

echo "== installing slattn with its test extras"
"$PYTHON" -m pip install -q "scikit-build-core>=0.10" "nanobind>=2.0" ninja
"$PYTHON" -m pip install -q --no-build-isolation ".[test]"

echo "== C++ tests"
cmake --preset cpu >/dev/null
cmake --build --preset cpu
ctest --preset cpu

echo "== Python tests"
# Run from outside the source tree so that the installed package is tested.
cd tests/python
"$PYTHON" -m pytest -q -p no:cacheprovider .
