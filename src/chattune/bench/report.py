"""What `chattune bench` reports: a recipe's figures over its rounds (means), MFU and the ratios to the tutorial
recipe, the table it prints and the JSON it writes (`out=`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chattune.bench.recipes import BenchSpec

TIMED = ("tokens_per_s", "s_per_step", "total_seconds", "startup_seconds", "process_seconds", "peak_memory_mb",
         "peak_memory_growth_mb", "achieved_gflops")


def combine_rounds(runs: list[dict]) -> dict:
    """One recipe's result over its rounds: the first round's record (its losses, held-out score and settings)
    with every timed figure replaced by the mean over the rounds, and each round's figures under `rounds`."""
    combined = {k: v for k, v in runs[0].items() if k not in ("round", "position")}
    if len(runs) == 1:
        return combined
    for key in TIMED:
        values = [r[key] for r in runs if r.get(key) is not None]
        combined[key] = round(sum(values) / len(values), 3) if len(values) == len(runs) else combined.get(key)
    combined["rounds"] = [{k: r.get(k) for k in ("round", "position", *TIMED, "final_loss")} for r in runs]
    return combined


def add_ratios(results: dict[str, dict], machine: dict) -> dict:
    peaks = machine.get("matmul_gflops", {})
    for r in results.values():
        peak = peaks.get(r["precision"]) or peaks.get("fp32")
        r["matmul_peak_gflops"] = peak
        r["mfu_percent"] = round(100 * r["achieved_gflops"] / peak, 2) if peak else None
    ratios = {}
    if "tutorial" in results:
        base = results["tutorial"]
        for name, r in results.items():
            if name == "tutorial":
                continue
            ratios[f"{name}_vs_tutorial"] = {
                "tokens_per_s": round(r["tokens_per_s"] / base["tokens_per_s"], 2) if base["tokens_per_s"] else None,
                "peak_memory": round(r["peak_memory_mb"] / base["peak_memory_mb"], 3) if base["peak_memory_mb"] else None,
                "final_loss_diff": (round(r["final_loss"] - base["final_loss"], 4)
                                    if r["final_loss"] is not None and base["final_loss"] is not None else None),
                "process_seconds": (round(base["process_seconds"] / r["process_seconds"], 2)
                                    if r.get("process_seconds") and base.get("process_seconds") else None),
                "heldout_loss_diff": (round(r["heldout_loss"] - base["heldout_loss"], 4)
                                      if r.get("heldout_loss") is not None and base.get("heldout_loss") is not None
                                      else None),
            }
    if "dynamic" in results and "chattune" in results and results["dynamic"]["tokens_per_s"]:
        ratios["chattune_vs_dynamic"] = {
            "tokens_per_s": round(results["chattune"]["tokens_per_s"] / results["dynamic"]["tokens_per_s"], 2)}
    return ratios


def format_table(results: dict[str, dict], ratios: dict, machine: dict) -> str:
    head = ["recipe", "precision", "batching", "logits", "real tok/s", "s/step", "start-up s", "process s",
            "peak MB", "growth MB", "final loss", "held-out loss", "GFLOP/s", "MFU %"]
    rows = [head]
    for r in results.values():
        growth = r["peak_memory_growth_mb"]
        rows.append([r["recipe"], r["precision"], r["batching"], r["logits"], f"{r['tokens_per_s']:.1f}",
                     f"{r['s_per_step']:.2f}",
                     f"{r['startup_seconds']:.1f}" if r.get("startup_seconds") is not None else "-",
                     f"{r['process_seconds']:.1f}" if r.get("process_seconds") is not None else "-",
                     f"{r['peak_memory_mb']:.0f}",
                     f"{growth:.0f}" if growth is not None else "-",
                     f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-",
                     f"{r['heldout_loss']:.4f}" if r.get("heldout_loss") is not None else "-",
                     f"{r['achieved_gflops']:.1f}", f"{r['mfu_percent']:.1f}" if r["mfu_percent"] is not None else "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in machine.get("matmul_gflops", {}).items())
    where = machine.get("cpu") or machine.get("gpu") or machine["device"]
    extra = f", capability {machine['cpu_capability']}, {machine['threads']} threads" if "cpu" in machine else ""
    lines.append(f"machine: {where}{extra}; measured matmul GFLOP/s: {peaks}")
    for name, r in results.items():
        if r.get("rounds"):
            each = ", ".join(f"{x['tokens_per_s']:.1f} (run {x['position']} of its round)" for x in r["rounds"])
            lines.append(f"rounds of {name} (mean shown above): real tok/s {each}")
    for name, ratio in ratios.items():
        parts = [f"{ratio['tokens_per_s']}x real tokens/s"]
        if ratio.get("process_seconds"):
            parts.append(f"{ratio['process_seconds']}x whole process")
        if "peak_memory" in ratio:
            parts.append(f"{ratio['peak_memory']}x peak memory")
        if ratio.get("final_loss_diff") is not None:
            parts.append(f"final loss {ratio['final_loss_diff']:+.4f}")
        if ratio.get("heldout_loss_diff") is not None:
            parts.append(f"held-out loss {ratio['heldout_loss_diff']:+.4f}")
        lines.append(f"speedup {name.replace('_vs_', ' vs ')}: " + ", ".join(parts))
    return "\n".join(lines)


def build_report(spec: BenchSpec, n_samples: int, machine: dict, results: dict[str, dict], ratios: dict) -> dict:
    """The JSON that `out=` receives: the settings, the machine, every recipe's figures, the ratios and the method."""
    settings = {k: v for k, v in spec.model_dump().items() if k not in ("out", "isolate")}
    return {"settings": settings | {"samples_used": n_samples},
            "machine": machine, "recipes": results, "ratios": ratios,
            "method": {"throughput": "real (non-pad) tokens / seconds inside optimizer steps, first step excluded",
                       "memory": ("peak RSS during training (high-water mark reset at train start), fresh process "
                                  "per recipe" if spec.isolate else "peak RSS during training, same process")
                       if machine["device"] == "cpu" else "torch.cuda.max_memory_allocated during training",
                       "final_loss": f"trained-token-weighted mean loss of the last {spec.last} steps",
                       "heldout_loss": (f"records {spec.samples}..{spec.samples + spec.eval_samples - 1} of the data, "
                                        "scored in fp32 on the fp32 base with the recipe's adapter"),
                       "mfu": "(4 x frozen params + 6 x trainable params) x real tokens/s / measured matmul FLOP/s",
                       "startup": "launch of the recipe's process -> its first optimizer step begins",
                       "process": "launch of the recipe's process -> training done and saved (held-out scoring "
                                  "not counted); the whole-process speedup is tutorial's time / the recipe's"}}
