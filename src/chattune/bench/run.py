"""`chattune bench`'s run: the recipes in rounds, each in a fresh subprocess (`python -m chattune.bench --worker
JOB`, measure.run_recipe there), then the report.

- each recipe runs in a fresh subprocess (a freed PyTorch heap does not shrink the RSS, so a second recipe in the
  same process would be measured against the first one's leftovers); the machine's matmul peak is measured in the
  parent, once, with the same thread count;
- order: on a shared VM the recipe that runs second can be measurably faster whatever it is (seen on the project's
  AVX2 VM: docs/benchmarks.md), so `rounds=N` runs the recipe list N times, reversing the order every other round
  (ABBA...), and reports each recipe's mean over its rounds, with every round's figures and position in the JSON;
  the held-out loss (deterministic) is scored in the first round only;
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chattune.bench.measure import WORKER_PREFIX, machine_info, run_recipe
from chattune.bench.recipes import RECIPES, BenchSpec, parse_args, subset_file
from chattune.bench.report import add_ratios, build_report, combine_rounds, format_table
from chattune.errors import ChattuneError, ConfigError


def _run_isolated(spec: BenchSpec, recipe: str, data_file: Path, n_samples: int, workdir: Path, log,
                  eval_file: Path | None = None) -> dict:
    job = workdir / f"job-{recipe}.json"
    result_path = workdir / f"result-{recipe}.json"
    job.write_text(json.dumps({"spec": spec.model_dump(), "recipe": recipe, "data_file": str(data_file),
                               "n_samples": n_samples, "workdir": str(workdir), "result": str(result_path),
                               "eval_file": str(eval_file) if eval_file else None,
                               "spawned_at": time.time()}))  # start-up and whole-process times count from here
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "chattune.bench", "--worker", str(job)]
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            # the training progress bar redraws with "\r" and no newline, so a report can follow it on one line
            # (or, when the bar's last redraw ends without one, right after it on the same line)
            for part in line.rstrip("\n").split("\r"):
                _, found, report = part.partition(WORKER_PREFIX)
                if found:
                    log(f"  {recipe}: {report}")
                elif part.strip():
                    tail = (tail + [part])[-40:]
        rc = proc.wait()
    if rc != 0 or not result_path.exists():
        error = json.loads(result_path.read_text()).get("error") if result_path.exists() else None
        raise ConfigError(f"bench: recipe `{recipe}` failed (exit {rc})"
                          + (f": {error}" if error else "") + "\n" + "\n".join(tail[-20:]))
    return json.loads(result_path.read_text())


def _worker(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    spec = BenchSpec.model_validate(job["spec"])
    from chattune.log import quiet_libraries

    quiet_libraries()
    try:
        eval_file = Path(job["eval_file"]) if job.get("eval_file") else None
        result = run_recipe(spec, job["recipe"], Path(job["data_file"]), job["n_samples"], Path(job["workdir"]),
                            eval_file, job.get("spawned_at"))
    except ChattuneError as e:
        Path(job["result"]).write_text(json.dumps({"error": str(e)}))
        print(str(e), file=sys.stderr)
        return 2
    Path(job["result"]).write_text(json.dumps(result))
    return 0


def main(args: list[str], log=print) -> int:
    spec = parse_args(args)
    machine = machine_info(spec.threads)
    log(f"bench: {spec.samples} samples from {spec.data}, {spec.steps} steps of batch {spec.batch_size}, "
        f"max_length {spec.max_length}, LoRA r={spec.lora.r} on all linear layers; recipes: {', '.join(spec.recipes)}")
    log(f"bench: matmul GFLOP/s on this machine: {machine['matmul_gflops']}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="chattune-bench-") as tmp:
        workdir = Path(tmp)
        data_file, n_samples, eval_file = subset_file(spec.data, spec.samples, workdir, spec.eval_samples)
        if n_samples < spec.batch_size:
            raise ConfigError(f"bench: {spec.data} holds only {n_samples} records, fewer than batch_size")
        runs: dict[str, list[dict]] = {recipe: [] for recipe in spec.recipes}
        for round_index in range(spec.rounds):
            order = spec.recipes if round_index % 2 == 0 else spec.recipes[::-1]
            scored = eval_file if round_index == 0 else None
            for position, recipe in enumerate(order):
                where = f", round {round_index + 1} of {spec.rounds}" if spec.rounds > 1 else ""
                log(f"bench: recipe `{recipe}` ({RECIPES[recipe]['about']}{where})")
                if spec.isolate:
                    run = _run_isolated(spec, recipe, data_file, n_samples, workdir, log, scored)
                else:
                    run = run_recipe(spec, recipe, data_file, n_samples, workdir, scored)
                runs[recipe].append(run | {"round": round_index + 1, "position": position + 1})
        results = {recipe: combine_rounds(recipe_runs) for recipe, recipe_runs in runs.items()}
    ratios = add_ratios(results, machine)
    table = format_table(results, ratios, machine)
    print(table, flush=True)
    report = build_report(spec, n_samples, machine, results, ratios)
    if spec.out:
        out = Path(spec.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        log(f"bench: results written to {out}")
    return 0

