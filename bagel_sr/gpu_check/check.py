"""One prepared GPU check: the checkout's own ``main()`` on CUDA, then what the pixel term costs at 7B widths.

    python -m bagel_sr.gpu_check --bagel_root PATH [--out DIR] [--device cuda|cpu] [--parts smoke,bench]

1. ``smoke``: the dry run (:mod:`.smoke`, its launches, checks and strict reload, called as it is) on all visible
   GPUs under ``torchrun`` with NCCL, FULL_SHARD and no CPU patches: its worker is this module's, which runs the
   same worker with the ``dryrun`` rows of the registry left out. The launch logs' start-up banner must list none
   of those rows (``--device cpu`` runs the same path with them, which is how CI tests this script).
2. ``bench``: :mod:`.step` at BAGEL-7B-MoT's widths on the first GPU (a subprocess with the time left), then
   :mod:`.gpu_report`'s 28-layer extrapolation and the goal (pixel term <= 3% of the step, <= 2 GiB extra peak).

It logs the environment first (GPUs, driver, CUDA, torch, NCCL, flash-attn or why SDPA, transformers), stops at
once on what would waste a booking (no CUDA device, no checkout), downloads nothing, and writes ``gpu_check.json``,
``gpu_check.md``, the launch logs and the benchmark's log under ``--out``. Last line: ``gpu_check: OK ...`` (exit
0) or ``gpu_check: FAILED: ...`` (exit 1).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

from bagel_sr.errors import ArgumentParser, BadInput, MissingInput, cli_main

from bagel_sr.patches import launch, registry
from bagel_sr.smoke import dry_run as smoke

from . import env as gpu_env
from . import report as gpu_report

WORKER_MODULE = "bagel_sr.gpu_check.check"
DEVICE_ENV = "BAGEL_SR_GPU_CHECK_DEVICE"  # tells this module's worker which device the launch runs on
BANNER = re.compile(r"patches in force: (.*)")
#: Defaults per device: a GPU gets BAGEL-7B's widths, a CPU (tests of the script) toy ones.
DEFAULTS = {
    "cuda": dict(widths="7b", layers="2,4", tokens=16384, paired=4, image_px=512, warmup=2, repeats=5),
    "cpu": dict(widths="toy", layers="2,4", tokens=256, paired=2, image_px=64, warmup=1, repeats=2),
}


def dryrun_patches() -> List[str]:
    return [p.name for p in registry.select(groups=("dryrun",))]


# --------------------------------------------------------------------------------------------------- deadline

def _descendants(pid: int) -> List[int]:
    """Ids of the processes started by ``pid`` and by them (Linux ``/proc``; empty elsewhere)."""
    children: Dict[int, List[int]] = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@contextlib.contextmanager
def deadline(seconds: float):
    """Yields an event set when ``seconds`` pass first: the processes this one started are then killed, by id, so
    a part that hangs without a word (a stuck collective) still ends and the check still writes its report."""
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        for pid in reversed(_descendants(os.getpid())):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield expired
    finally:
        timer.cancel()


# ----------------------------------------------------------------------------------------------- part 1: smoke

class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


@contextlib.contextmanager
def _smoke_through_this_worker(smoke_module, device: str):
    """The dry run's launches start this module's worker, told the device through the environment."""
    old_worker, old_env = smoke_module.WORKER_MODULE, os.environ.get(DEVICE_ENV)
    smoke_module.WORKER_MODULE, os.environ[DEVICE_ENV] = WORKER_MODULE, device
    try:
        yield
    finally:
        smoke_module.WORKER_MODULE = old_worker
        if old_env is None:
            os.environ.pop(DEVICE_ENV, None)
        else:
            os.environ[DEVICE_ENV] = old_env


def banner_check(log_text: str, device: str) -> str:
    """The start-up banner of a launch lists the patches in force: on CUDA none of the ``dryrun`` rows may be
    among them, on a CPU they must be (else the run was not what it claims). Returns a note; raises on failure."""
    lines = BANNER.findall(log_text)
    if not lines:
        raise smoke.SmokeFailure("no start-up banner ('patches in force: ...') in the launch log")
    applied = {name.split(" (")[0].strip() for line in lines for name in line.split("), ")}
    cpu_rows = sorted(applied & set(dryrun_patches()))
    if device == "cuda" and cpu_rows:
        raise smoke.SmokeFailure(f"CPU patches were in force in the CUDA run: {', '.join(cpu_rows)}")
    if device == "cpu" and not cpu_rows:
        raise smoke.SmokeFailure("the CPU run had none of the dry run's CPU patches in force")
    return ("no CPU patch in force (CUDA, NCCL)" if device == "cuda"
            else f"CPU patches in force: {', '.join(cpu_rows)}")


def run_smoke(args: argparse.Namespace, out: pathlib.Path, seconds: float) -> Dict[str, Any]:
    """The dry run's own ``run`` with this module's worker, stopped after ``seconds``; its last line, the banner
    check, the launch logs."""
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bagel_sr_gpu_check_"))
    argv = ["--bagel_root", args.bagel_root, "--steps", str(args.steps), "--nproc", str(args.nproc),
            "--workdir", str(workdir), "--timeout", str(args.launch_timeout)]
    if args.bagel_train_script:
        argv += ["--bagel_train_script", args.bagel_train_script]
    started, captured = time.time(), io.StringIO()
    try:
        with _smoke_through_this_worker(smoke, args.device), contextlib.redirect_stdout(_Tee(sys.stdout, captured)), \
                deadline(seconds) as expired:
            code = smoke.run(argv)
        lines = [ln for ln in captured.getvalue().splitlines() if ln.startswith("smoke: ")]
        line = lines[-1] if lines else "smoke: no result line"
        if expired.is_set():
            line = f"stopped after {seconds:.0f} s (its share of --budget_s): {line}"
        checks, ok = [], code == 0
        for i in (1, 2):
            log = workdir / f"launch{i}.log"
            if log.is_file():
                shutil.copy2(log, out / f"smoke_launch{i}.log")
                try:
                    checks.append(f"launch {i}: " + banner_check(log.read_text(errors="replace"), args.device))
                except smoke.SmokeFailure as failure:
                    checks.append(f"launch {i}: FAILED: {failure}")
                    ok = False
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return dict(ok=ok, line=line, checks=checks, seconds=time.time() - started, nproc=args.nproc)


def worker(argv: Sequence[str]) -> None:
    """One rank: the dry run's worker, with the ``dryrun`` rows only when the device is the CPU."""
    dry_run = os.environ.get(DEVICE_ENV, "cuda") == "cpu"
    wrapped = launch.main

    def main(*a: Any, **k: Any) -> Any:
        k["dry_run"] = dry_run
        return wrapped(*a, **k)

    launch.main = main
    try:
        smoke.worker(argv)
    finally:
        launch.main = wrapped


# ----------------------------------------------------------------------------------------------- part 2: bench

def run_bench(args: argparse.Namespace, out: pathlib.Path, seconds: float) -> Dict[str, Any]:
    """:mod:`.step` in a subprocess limited to ``seconds``; its JSON (partial if it stopped) plus ``error``."""
    json_path = out / "gpu_step.json"
    json_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bagel_sr.gpu_check.step", "--bagel_root", args.bagel_root,
           "--device", "cuda:0" if args.device == "cuda" else "cpu", "--widths", args.widths, "--layers", args.layers,
           "--tokens", str(args.tokens), "--paired", str(args.paired), "--image_px", str(args.image_px),
           "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--json", str(json_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.device == "cpu":  # threads oversubscribed on a busy CPU stall the toy steps
        env.setdefault("OMP_NUM_THREADS", "1")
    with open(out / "gpu_step.log", "w", buffering=1) as log, deadline(seconds) as expired:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            for line in proc.stdout:
                log.write(line)
                print("  " + line.rstrip()[:200], flush=True)
        finally:
            code = proc.wait()
    error = f"stopped after {seconds:.0f} s (the time left of --budget_s)" if expired.is_set() else None
    if error is None and code != 0:
        tail = (out / "gpu_step.log").read_text(errors="replace").strip().splitlines()[-3:]
        error = f"exit code {code}: " + " | ".join(tail)
    bench = json.loads(json_path.read_text()) if json_path.is_file() else {"depths": []}
    if error:
        bench["error"] = error
    return bench


# ---------------------------------------------------------------------------------------------------- the CLI

def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m bagel_sr.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--bagel_root", default=os.environ.get("BAGEL_ROOT"), help="your BAGEL checkout (or BAGEL_ROOT)")
    p.add_argument("--bagel_train_script", default=None, help="training script inside the checkout (autodetected)")
    p.add_argument("--out", default="gpu_check_out", help="folder for the JSON, markdown and logs (default gpu_check_out)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default); cpu runs the same script at toy widths under the CPU patches (a test)")
    p.add_argument("--parts", default="smoke,bench", help="what to run: smoke, bench or both (default smoke,bench)")
    p.add_argument("--nproc", type=int, default=None, help="ranks of the main() run (default: every GPU; 2 on cpu)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps of the main() run, in two launches (default 4)")
    p.add_argument("--budget_s", type=int, default=480, help="seconds for the whole check (default 480)")
    p.add_argument("--widths", choices=("7b", "toy"), default=None, help="benchmark widths (default 7b on cuda)")
    p.add_argument("--layers", default=None, help="benchmark depths, two or more (default 2,4)")
    for name, kind, what in (("tokens", int, "tokens of the benchmark's micro-batch"),
                             ("paired", int, "paired targets in it"), ("image_px", int, "image side in pixels"),
                             ("warmup", int, "untimed rounds"), ("repeats", int, "timed rounds")):
        p.add_argument(f"--{name}", type=kind, default=None, help=f"{what} (default: per device)")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not args.parts or set(args.parts) - {"smoke", "bench"}:
        raise BadInput(f"--parts {','.join(args.parts)}: give smoke, bench or smoke,bench")
    if not args.bagel_root:
        raise BadInput("--bagel_root PATH (or BAGEL_ROOT=PATH) is required: the check runs your checkout")
    if not pathlib.Path(args.bagel_root).expanduser().is_dir():
        raise MissingInput(f"--bagel_root {args.bagel_root}: no such folder")
    if "bench" in args.parts and len({x for x in args.layers.split(",") if x.strip()}) < 2:
        raise BadInput(f"--layers {args.layers}: the 28-layer extrapolation needs two depths, e.g. 2,4")
    return args


def check_device(args: argparse.Namespace) -> None:
    """Fail fast: a CUDA check needs CUDA devices (and as many as --nproc)."""
    import torch

    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise BadInput(f"torch {torch.__version__} sees no CUDA device; install the torch build of your CUDA, "
                           "or give --device cpu to test this script on a CPU at toy widths")
        count = torch.cuda.device_count()
        args.nproc = args.nproc or count
        if args.nproc > count:
            raise BadInput(f"--nproc {args.nproc}: only {count} CUDA device(s) visible")
    else:
        args.nproc = args.nproc or 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    check_device(args)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # nothing is fetched, by this process or its launches
        os.environ.setdefault(name, "1")
    started = time.time()
    out = pathlib.Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = gpu_env.environment(args.device, args.bagel_root)
    print("gpu_check: environment\n" + "\n".join(f"  {k}: {v}" for k, v in env.items()), flush=True)
    args.launch_timeout = smoke_share = max(60, args.budget_s // 2)
    result: Dict[str, Any] = dict(device=args.device, environment=env, smoke=None, bench=None, extrapolation=None)
    failures: List[str] = []
    if "smoke" in args.parts:
        print(f"gpu_check: part 1, the checkout's main() on {args.nproc} rank(s) ({args.device}), two launches",
              flush=True)
        result["smoke"] = run_smoke(args, out, smoke_share if "bench" in args.parts else args.budget_s)
        if not result["smoke"]["ok"]:
            failures.append("main() run: " + result["smoke"]["line"])
    if "bench" in args.parts:
        left = args.budget_s - (time.time() - started) - 5
        print(f"gpu_check: part 2, the cost benchmark ({args.widths} widths, layers {args.layers}; {left:.0f} s left)",
              flush=True)
        result["bench"] = bench = run_bench(args, out, max(left, 30))
        if len(bench.get("depths", [])) >= 2:
            result["extrapolation"] = gpu_report.extrapolate(bench["depths"])
            result["goals"] = gpu_report.goals(result["extrapolation"])
        if bench.get("error"):
            failures.append("benchmark: " + bench["error"])
    result["seconds"] = time.time() - started
    markdown = gpu_report.report_markdown(result)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_check.md").write_text(markdown)
    print("\n" + markdown, flush=True)
    if failures:
        print(f"gpu_check: FAILED in {result['seconds']:.0f} s: " + "; ".join(failures) + f" (files: {out})", flush=True)
        return 1
    print(f"gpu_check: OK in {result['seconds']:.0f} s (files: {out})", flush=True)
    return 0


def entry(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        worker(argv[1:])
        return 0
    return cli_main(main, argv)


if __name__ == "__main__":
    sys.exit(entry())
