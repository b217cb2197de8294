"""`chattune train [CONFIG] [key=value ...] [--nproc N]`."""

HELP = "fine-tune: chattune train [CONFIG] [key=value ...] (configs: lora, ptuning_v2, freeze, sft, qlora)"


def configure(p) -> None:
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine (launches torchrun: one per GPU, or CPU processes "
                        "sharing the cores)")


def run(args) -> int:
    import os

    from chattune.config import config_from_args
    from chattune.log import log

    cfg = config_from_args(args.args)  # a bad config fails here, before any process is launched
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch(args.nproc, args.args, log)
    from chattune.train.setup import is_main_process
    from chattune.train.trainer import train

    result = train(cfg, log=log)
    if is_main_process():
        note = " (stopped early by train.stop_after)" if result.stopped_early else ""
        loss = None if result.final_loss is None else round(result.final_loss, 4)
        log(f"done{note}: {result.steps} steps in {result.train_seconds:.1f}s, final loss {loss}, "
            f"{result.tokens_per_s:.0f} tokens/s, peak memory {result.peak_memory_mb:.0f} MB -> {result.output_dir}")
    return 0


def launch(nproc: int, argv: list[str], log) -> int:
    """Re-run this command under torchrun with `nproc` processes (DDP: NCCL on GPUs, gloo on CPU)."""
    import os
    import subprocess
    import sys

    from chattune.hardware import cpu_cores

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_cores() // nproc)))  # threads per process = cores / processes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "chattune", "train", *argv]
    log(f"launching {nproc} processes: torchrun --standalone --nproc_per_node={nproc} -m chattune train "
        + " ".join(argv))
    return subprocess.run(cmd, env=env).returncode
