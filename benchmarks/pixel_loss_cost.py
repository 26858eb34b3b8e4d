"""What the pixel term costs, measured side by side in one run (a script, never a timed test).

    python benchmarks/pixel_loss_cost.py            # default run (about 10 minutes on 2 CPU cores)
    python benchmarks/pixel_loss_cost.py --quick    # small sizes, under 2 minutes
    BAGEL_ROOT=/path/to/Bagel python benchmarks/pixel_loss_cost.py   # also part (b), a tiny real BAGEL

(a) Decode + backward to the latent, time and extra peak memory per image, for BAGEL's full-size VAE geometry
    (FLUX: diffusers AutoencoderKL, block_out_channels (128, 256, 512, 512), 2 layers per block, 16 latent
    channels, 8x; random weights), for the whole image, the whole image with checkpointing (the wrapper's
    default), a crop, and a crop with checkpointing.  Each configuration runs in a fresh process; its extra peak
    memory is its peak RSS minus that of a baseline process that only builds the VAE and the inputs.
(b) One training step (forward, backward, AdamW) of a tiny random BAGEL on CPU, through the CPU patch, with and
    without the pixel term at the wrapper's defaults (needs BAGEL_ROOT).
(c) The pixel term's cost (armed step minus flow-only step) as target images per micro-batch grow from 1 to 32,
    with max_images = 4 (flat beyond 4) and without a limit (linear).
(d) Each fidelity term's cost over L2 alone (``--pixel_loss_terms``): one paired target image at t = 0.1 through
    the contract model and BAGEL's full-size VAE geometry, checkpointing on; the pixel term's time (armed step
    minus flow-only step, best of ``--repeats_d``) and extra peak memory (peak RSS of a fresh process minus that of
    a flow-only process), and both as ratios to L2 alone.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch


from bagel_sr.embedded import _compat  # noqa: F401  (a torchvision that cannot load is treated as absent: all parts)
from bagel_sr import PixelLossConfig, with_pixel_loss
from bagel_sr.config import CONSERVATIVE_DEFAULTS

from cost_workers import MODES, best_step_time, decode_worker, flux_vae, term_worker

TARGET_SIZE, TARGET_MEM, TARGET_TIME = 512, 0.3, 1.3  # the cost goal: crop+ckpt vs whole at 512 px (memory, time ratios)


# ------------------------------------------------------------------------------------------ (a) decode

def run_worker(args, size: int, mode: str) -> Dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", "--size", str(size), "--mode", mode,
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--crop", str(args.crop),
           "--margin", str(args.margin), "--dtype", args.dtype]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return dict(error=f"exit code {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def decoded_side(size: int, mode: str, crop: int, margin: int) -> int:
    """Side in pixels of what a mode decodes (the crop window grown by the margin, clipped to the image)."""
    latent = size // 8
    if not MODES[mode][0] or crop <= 0:
        return size
    inner = min(crop, latent)
    return 8 * min(latent, inner + 2 * margin)


def mem_available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def part_a(args) -> Dict:
    print(f"\n## (a) decode + backward per image, FLUX-geometry VAE, {args.dtype}, {args.threads} threads, "
          f"best of {args.repeats}\n", flush=True)
    results: Dict = {}
    seen: Dict[str, tuple] = {}  # mode -> (decoded side, extra GB) of the largest run so far, to extrapolate
    for size in args.sizes:
        base = run_worker(args, size, "baseline")
        if "error" in base:
            print(f"baseline at {size} px failed: {base['error']}")
            continue
        if not results:
            print(f"VAE: {base['params'] / 1e6:.1f}M parameters; checkpointing wraps {base['blocks']} decoder blocks; "
                  f"crop {args.crop} latent px + margin {args.margin} (decodes {8 * (args.crop + 2 * args.margin)} px, "
                  f"loss on {8 * args.crop} px)", flush=True)
        for mode in args.modes:
            side = decoded_side(size, mode, args.crop, args.margin)
            skip = skip_reason(args, size, mode, side, seen)
            if skip:
                results[(size, mode)] = dict(skipped=skip, est_gb=skip_estimate(side, mode, seen))
                print(f"  {size:5d} px  {mode:11s} skipped: {skip}", flush=True)
                continue
            r = run_worker(args, size, mode)
            if "error" in r:
                results[(size, mode)] = dict(skipped=r["error"])
                print(f"  {size:5d} px  {mode:11s} failed: {r['error']}", flush=True)
                continue
            extra = max(0.0, (r["peak_kb"] - base["peak_kb"]) / 2**20)
            results[(size, mode)] = dict(time=min(r["times"]), gb=extra, side=side)
            seen[mode] = (side, extra)
            print(f"  {size:5d} px  {mode:11s} decodes {side:4d} px: {min(r['times']):7.1f} s  {extra:6.2f} GB", flush=True)
    print_table_a(args, results)
    return results


def skip_estimate(side: int, mode: str, seen: Dict) -> Optional[float]:
    if mode not in seen:
        return None
    prev_side, prev_gb = seen[mode]
    return prev_gb * (side / prev_side) ** 2  # activations grow with the decoded pixel count


def skip_reason(args, size: int, mode: str, side: int, seen: Dict) -> Optional[str]:
    est = skip_estimate(side, mode, seen)
    avail = mem_available_gb()
    if est is not None and est > 0.8 * avail:
        return f"needs ~{est:.0f} GB (extrapolated from {seen[mode][0]} px), {avail:.0f} GB available"
    if not MODES[mode][0] and size > args.whole_max_size:
        return (f"whole-image decode above --whole_max_size {args.whole_max_size} px (time budget)"
                + (f"; ~{est:.0f} GB extrapolated" if est is not None else ""))
    return None


def print_table_a(args, results: Dict) -> None:
    print("\n| size | configuration | decoded px | time / image | extra peak memory / image | time vs whole | memory vs whole |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        ref = results.get((size, "whole"), {})
        for mode in args.modes:
            r = results.get((size, mode))
            if r is None:
                continue
            if "skipped" in r:
                est = f"~{r['est_gb']:.1f} GB (est.)" if r.get("est_gb") is not None else "n/a"
                print(f"| {size} | {mode} | {decoded_side(size, mode, args.crop, args.margin)} | skipped | {est} | | |")
                continue
            tr = f"{r['time'] / ref['time']:.2f}x" if "time" in ref else ""
            mr = f"{r['gb'] / ref['gb']:.2f}x" if "gb" in ref and ref["gb"] > 0 else ""
            if not mr and ref.get("est_gb"):
                mr = f"~{r['gb'] / ref['est_gb']:.2f}x (est.)"
            print(f"| {size} | {mode} | {r['side']} | {r['time']:.1f} s | {r['gb']:.2f} GB | {tr} | {mr} |")
    whole, best = results.get((TARGET_SIZE, "whole"), {}), results.get((TARGET_SIZE, "crop+ckpt"), {})
    if "time" in whole and "time" in best:
        m, t = best["gb"] / whole["gb"], best["time"] / whole["time"]
        ok = m <= TARGET_MEM and t <= TARGET_TIME
        print(f"\nTarget at {TARGET_SIZE} px, crop+ckpt vs whole: memory {m:.2f}x (<= {TARGET_MEM}x), "
              f"time {t:.2f}x (<= {TARGET_TIME}x): {'MET' if ok else 'NOT MET'}")


# --------------------------------------------------------------------------------- (b) tiny real BAGEL step

def part_b(args) -> None:
    print("\n## (b) one training step of a tiny random BAGEL on CPU (forward, backward, AdamW)\n", flush=True)
    if not os.environ.get("BAGEL_ROOT"):
        print("skipped: set BAGEL_ROOT to a BAGEL checkout to run this part")
        return
    from bagel_sr.testing import bagel_tiny as bt

    ae = bt.build_tiny_autoencoder()
    config = PixelLossConfig(**CONSERVATIVE_DEFAULTS)
    rows = []
    for label, eligible in (("every target eligible (t = 0.12, paired)", True), ("t drawn as in training", False)):
        batches = [tiny_batch(bt, ae, seed, eligible, args.b_samples) for seed in range(args.b_steps)]
        flow = time_steps(bt, ae, None, batches)
        armed = time_steps(bt, ae, config, batches)
        used = statistics.mean(armed["images"])
        rows.append((label, flow["time"], armed["time"], used))
    print(f"{args.b_samples} edit samples per micro-batch (64x64 condition and target), tiny Bagel (2 layers, hidden 64), "
          f"BAGEL's AutoEncoder class (ch 32); wrapper defaults: weight 0.05, l2, max_t 0.3, paired only, max_images 4, "
          f"checkpointing on; mean over the same {args.b_steps} batches\n")
    print("| batch | flow only | flow + pixel | ratio | images decoded / step |")
    print("|---|---:|---:|---:|---:|")
    for label, tf, ta, used in rows:
        print(f"| {label} | {1000 * tf:.0f} ms | {1000 * ta:.0f} ms | {ta / tf:.2f}x | {used:.1f} |")


def tiny_batch(bt, ae, seed: int, eligible: bool, n: int) -> Dict:
    raw = -2.0 if eligible else None  # sigmoid(-2) = 0.12 <= max_t
    specs = [{"kind": "edit", "cond_hw": (4, 4), "target_hw": (4, 4), **({"timesteps": [raw]} if eligible else {})}
             for _ in range(n)]
    torch.manual_seed(seed)
    return bt.encode_batch(ae, bt.make_packed_batch(specs, seed=seed))


def time_steps(bt, ae, config: Optional[PixelLossConfig], batches: List[Dict]) -> Dict:
    cls = with_pixel_loss(bt.import_bagel().bagel.Bagel)
    model = bt.build_tiny_bagel(cls=cls, llm2vae_std=0.02)
    if config is not None:
        model.attach_pixel_loss(config, ae)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times, images = [], []
    for i, batch in enumerate([batches[0]] + batches):  # the first step warms up
        extra = dict(padded_images=batch["padded_images"], batch_data_indexes=batch["batch_data_indexes"]) if config else {}
        start = time.perf_counter()
        out = bt.run_forward(model, batch, **extra)
        loss = out["mse"].float().mean(-1).sum() / bt.num_target_tokens(batch)
        if config is not None:
            loss = loss + config.weight * out["pixel"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
            images.append(float(out.get("pixel_images", torch.tensor(0.0))))
    return dict(time=statistics.mean(times), images=images)


# ------------------------------------------------------------------------------- (c) cost vs images per batch

def part_c(args) -> Dict:
    print("\n## (c) pixel-term cost vs target images per micro-batch\n", flush=True)
    from bagel_sr.testing.contract_model import ContractModel, forward_kwargs, pack, set_timesteps

    vae = flux_vae(block_out_channels=(32, 32, 64, 64), layers_per_block=1)
    side = args.c_tokens * 16
    table = []
    for n in args.c_images:
        batch = set_timesteps(pack([[("cond", args.c_tokens, args.c_tokens), ("text", 2),
                                     ("target", args.c_tokens, args.c_tokens)]] * n, seed=n), [0, 0.1] * n)
        kw, images = forward_kwargs(batch, vae)
        flow = time_contract(ContractModel, kw, images, None, vae, args.repeats_c)
        capped = time_contract(ContractModel, kw, images, args.c_max_images, vae, args.repeats_c)
        free = time_contract(ContractModel, kw, images, 0, vae, args.repeats_c) if n <= args.c_uncapped_up_to else None
        table.append((n, flow, capped, free))
    print(f"contract model (per-token MLP), {side}x{side} targets, each paired and at t = 0.1 (all eligible), "
          f"small diffusers VAE (32-32-64-64, 1 layer/block), checkpointing on; pixel term = armed step - flow-only "
          f"step (forward + backward), best of {args.repeats_c}\n")
    print(f"| target images | flow-only step | pixel term, max_images={args.c_max_images} | vs {args.c_max_images} images "
          f"| pixel term, no limit |")
    print("|---:|---:|---:|---:|---:|")
    ref = next((c - f for n, f, c, _ in table if n == args.c_max_images), None)
    for n, f, c, free in table:
        rel = f"{(c - f) / ref:.2f}x" if ref else ""
        fr = f"{1000 * (free - f):.0f} ms" if free is not None else "not run"
        print(f"| {n} | {1000 * f:.0f} ms | {1000 * (c - f):.0f} ms | {rel} | {fr} |")
    beyond = [(c - f) / ref for n, f, c, _ in table if ref and n > args.c_max_images]
    if beyond:
        flat = max(beyond) <= 1.5
        print(f"\nFlat beyond max_images={args.c_max_images}: largest cost {max(beyond):.2f}x that at "
              f"{args.c_max_images} images (<= 1.5x): {'MET' if flat else 'NOT MET'}")
    return dict(table=table)


def time_contract(model_cls, kw, images, max_images: Optional[int], vae, repeats: int) -> float:
    torch.manual_seed(0)
    model = with_pixel_loss(model_cls)(hidden=32)
    extra = {}
    if max_images is not None:
        model.attach_pixel_loss(PixelLossConfig(weight=0.05, max_images=max_images), vae)
        extra = dict(padded_images=images)
    return best_step_time(model, kw, extra, repeats)


# ------------------------------------------------------------------------------------------ (d) fidelity terms

TERM_SETS = ("l2:1", "l2:1,ssim:0.1", "l2:1,grad:0.1", "l2:1,lpl:0.05", "l2:1,ssim:0.1,grad:0.1,lpl:0.05")


def part_d(args) -> Dict:
    print("\n## (d) cost of each fidelity term over L2 alone\n", flush=True)
    rows = {}
    for mode in ("flow",) + TERM_SETS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", "--mode", mode, "--d_tokens",
               str(args.d_tokens), "--repeats_d", str(args.repeats_d), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        if proc.returncode != 0:
            print(f"{mode}: failed ({proc.stderr.strip().splitlines()[-1:]})")
            continue
        rows[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    flow = rows["flow"]
    side = 16 * args.d_tokens
    print(f"one {side}x{side} paired target at t = 0.1, FLUX-geometry VAE (random weights, fp32, checkpointing), "
          f"contract model; pixel term = armed step - flow-only step (best of {args.repeats_d}); extra memory = peak "
          "RSS - flow-only process's\n")
    print("| terms | pixel-term time | vs L2 alone | extra peak memory | vs L2 alone |")
    print("|---|---:|---:|---:|---:|")
    ref = rows.get(TERM_SETS[0])
    for mode in TERM_SETS:
        if mode not in rows:
            continue
        dt = rows[mode]["time"] - flow["time"]
        dm = (rows[mode]["peak_kb"] - flow["peak_kb"]) / 2**20
        rt = dt / (ref["time"] - flow["time"]) if ref else float("nan")
        rm = dm / ((ref["peak_kb"] - flow["peak_kb"]) / 2**20) if ref else float("nan")
        print(f"| `{mode}` | {dt:.2f} s | {rt:.2f}x | {dm:.2f} GB | {rm:.2f}x |")
    return rows


# ------------------------------------------------------------------------------------------------------- main

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {mem_available_gb():.0f} GB available, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and counts, under 2 minutes")
    p.add_argument("--parts", default="abcd", help="which parts to run, e.g. 'ac'")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024], help="(a) image sides in pixels")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="(a) configurations")
    p.add_argument("--crop", type=int, default=32, help="(a) crop side in latent pixels (32 = a 256-px window)")
    p.add_argument("--margin", type=int, default=4, help="(a) crop margin in latent pixels")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="(a) decode dtype (bf16 = CPU autocast)")
    p.add_argument("--repeats", type=int, default=1, help="(a) timed runs per configuration (best is reported)")
    p.add_argument("--whole_max_size", type=int, default=1024, help="(a) largest size decoded whole (time budget)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: stable timings on a shared machine; oversubscribed threads stall)")
    p.add_argument("--b_samples", type=int, default=8, help="(b) edit samples per micro-batch")
    p.add_argument("--b_steps", type=int, default=8, help="(b) timed steps")
    p.add_argument("--c_images", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="(c) target images")
    p.add_argument("--c_max_images", type=int, default=4, help="(c) max_images")
    p.add_argument("--c_tokens", type=int, default=4, help="(c) image side in tokens (16 px each)")
    p.add_argument("--c_uncapped_up_to", type=int, default=32, help="(c) run the no-limit column up to this count")
    p.add_argument("--repeats_c", type=int, default=5, help="(c) timed steps per point")
    p.add_argument("--d_tokens", type=int, default=16, help="(d) image side in tokens (16 px each): 256 px")
    p.add_argument("--repeats_d", type=int, default=2, help="(d) timed steps per term set")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and not args._worker:
        args.sizes, args.crop, args.margin, args.whole_max_size = [64, 128], 8, 2, 128
        args.b_steps, args.c_images, args.repeats_c, args.c_uncapped_up_to = 3, [1, 4, 8, 32], 3, 8
        args.d_tokens, args.repeats_d = 4, 1
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args._worker:
        print(json.dumps(term_worker(args) if args.mode == "flow" or (args.mode and ":" in args.mode)
                         else decode_worker(args)))
        return
    torch.set_num_threads(args.threads)
    start = time.time()
    print(f"# bagel-sr pixel-loss cost{' (--quick)' if args.quick else ''}\n\nMachine: {machine()}; "
          f"{args.threads} torch threads")
    if "a" in args.parts:
        part_a(args)
    if "b" in args.parts:
        part_b(args)
    if "c" in args.parts:
        part_c(args)
    if "d" in args.parts:
        part_d(args)
    print(f"\n(total {time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
