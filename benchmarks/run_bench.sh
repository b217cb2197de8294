#!/usr/bin/env bash
# The benchmark runs behind docs/benchmarks.md. Needs ../shared/data beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
chattune bench samples=40 steps=10 recipes=tutorial,chattune out=benchmarks/results/bench-40x10.json
# the issue's full setting (slower: ~15 min on 2 CPU cores)
chattune bench samples=120 steps=30 recipes=tutorial,dynamic,chattune out=benchmarks/results/bench-120x30.json
