"""`python -m chattune.bench key=value ...` runs the benchmark; `--worker JOB` is one recipe's subprocess (run.py)."""

import sys

from chattune.bench.run import _worker, main

if len(sys.argv) == 3 and sys.argv[1] == "--worker":
    sys.exit(_worker(sys.argv[2]))
sys.exit(main(sys.argv[1:]))
