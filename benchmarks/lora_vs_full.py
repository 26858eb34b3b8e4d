"""LoRA vs full fine-tuning, measured side by side in one run on CPU (a script, never a timed test).

    BAGEL_ROOT=/path/to/Bagel python benchmarks/lora_vs_full.py            # both parts, about 5 minutes on 2 cores
    BAGEL_ROOT=/path/to/Bagel python benchmarks/lora_vs_full.py --skip_dry_run

(a) The CPU dry run of the checkout's own ``main()`` (``python -m bagel_sr.smoke``, 2 ranks, FSDP FULL_SHARD,
    pixel term on, one launch of ``--steps``), full fine-tuning and then ``--bagel_sr_lora_rank R``: the optimizer
    state the loop saved (bytes of its ``optimizer.*.pt`` shards' tensors, all ranks) and its logged
    ``Train Steps/Sec`` (median over the steps after the first).
(b) In one process, the checkout's ``Bagel`` at a few widths (random bf16 weights, as FSDP's mixed precision
    computes), one training step each (forward under CPU bf16 autocast, flow loss, backward, AdamW): parameters
    the optimizer holds, its state after the step (the values of its state tensors, counted at fp32 as the loop
    keeps them: 4 B each), and the step time (median of ``--repeats``), full fine-tuning vs peft LoRA
    (``bagel_sr.patches.lora``) on the default targets.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]

from bagel_sr.lora_settings import LoraSettings
from bagel_sr.patches.cpu import declare_torchvision_ops
from bagel_sr.testing import bagel_tiny as bt

declare_torchvision_ops()
STEPS_PER_SEC = re.compile(r"Train Steps/Sec: ([\d.]+)")


# ------------------------------------------------------------------------------------------ (a) the dry run

def dry_run(rank: int, steps: int, nproc: int, workdir: Path) -> Dict[str, float]:
    cmd = [sys.executable, "-m", "bagel_sr.smoke", "--bagel_root", os.environ["BAGEL_ROOT"], "--workdir",
           str(workdir), "--no_resume", "--steps", str(steps), "--nproc", str(nproc)]
    if rank:
        cmd += ["--bagel_sr_lora_rank", str(rank)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    last = [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip()][-1]
    if proc.returncode != 0 or not last.startswith("smoke: OK"):
        raise SystemExit(f"dry run failed: {last}")
    folder = max((workdir / "checkpoints").iterdir())
    state_bytes = 0
    for shard in folder.glob("optimizer.*.pt"):
        state = torch.load(shard, map_location="cpu", weights_only=True)["state"]
        state_bytes += sum(t.numel() * t.element_size() for s in state.values() for t in s.values()
                           if torch.is_tensor(t) and t.dim() > 0)
    speeds = [float(v) for v in STEPS_PER_SEC.findall((workdir / "launch1.log").read_text())][1:]
    return {"state_bytes": state_bytes, "sec_per_step": 1 / statistics.median(speeds)}


def part_a(args) -> None:
    print(f"## (a) CPU dry run of the checkout's main(): {args.nproc} ranks, {args.steps} steps, pixel term on\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rank in (0, args.rank):
            result = dry_run(rank, args.steps, args.nproc, Path(tmp) / "work")
            rows.append(("full fine-tuning" if rank == 0 else f"LoRA r={rank}", result))
    print("| method | optimizer state saved (all ranks) | s/step (median) |\n|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['state_bytes'] / 1024:,.1f} KiB | {r['sec_per_step']:.2f} |")
    full, lora = rows[0][1], rows[1][1]
    print(f"\nLoRA / full: optimizer state x{lora['state_bytes'] / full['state_bytes']:.3f}, "
          f"step time x{lora['sec_per_step'] / full['sec_per_step']:.2f}\n")


# ------------------------------------------------------------------------------------- (b) one process, widths

def build(bt, hidden: int, layers: int) -> torch.nn.Module:
    mods = bt.import_bagel()
    llm_config = bt.tiny_llm_config()
    llm_config.hidden_size, llm_config.intermediate_size = hidden, 4 * hidden
    llm_config.num_hidden_layers, llm_config.num_attention_heads, llm_config.num_key_value_heads = layers, 8, 2
    torch.manual_seed(0)
    language_model = mods.bagel.Qwen2ForCausalLM(llm_config)
    config = mods.bagel.BagelConfig(visual_gen=True, visual_und=False, llm_config=llm_config, vit_config=None,
                                    vae_config=bt.tiny_autoencoder_params(), latent_patch_size=bt.LATENT_PATCH,
                                    max_latent_size=bt.MAX_LATENT_SIZE, timestep_shift=1.0)
    model = mods.bagel.Bagel(language_model, None, config)
    torch.nn.init.normal_(model.llm2vae.weight, std=0.02)
    return model.to(torch.bfloat16).train()


def one_method(bt, batch, hidden: int, layers: int, rank: int, repeats: int) -> Dict[str, float]:
    from bagel_sr.patches import lora

    model = build(bt, hidden, layers)
    if rank:
        settings = LoraSettings(rank=rank)
        lora.inject(model, lora.lora_config(settings, lora.resolve_targets(model, settings.patterns)))
        lora.set_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0)
    times: List[float] = []
    for i in range(repeats + 1):
        torch.manual_seed(i)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**bt.forward_kwargs(batch))
        out["mse"].float().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    state = 4 * sum(t.numel() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    return {"trainable": sum(p.numel() for p in params), "total": sum(p.numel() for p in model.parameters()),
            "state_bytes": state, "sec": statistics.median(times[1:])}


def part_b(args) -> None:
    print(f"## (b) one training step in one process (flow loss, AdamW), LoRA r={args.rank} on the default targets\n")
    batch = bt.encode_batch(bt.build_tiny_autoencoder(),
                            bt.make_packed_batch([{"kind": "edit", "cond_hw": (4, 4)}] * 2, seed=1))
    print("| language model | method | trainable / all parameters | AdamW state | s/step (median) |\n"
          "|---|---|---|---|---|")
    for hidden, layers in args.widths:
        for rank in (0, args.rank):
            r = one_method(bt, batch, hidden, layers, rank, args.repeats)
            name = "full fine-tuning" if rank == 0 else f"LoRA r={rank}"
            print(f"| hidden {hidden}, {layers} MoT layers | {name} | {r['trainable']:,} / {r['total']:,} | "
                  f"{r['state_bytes'] / 2 ** 20:,.2f} MiB | {r['sec']:.3f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=8, help="LoRA rank compared with full fine-tuning")
    p.add_argument("--steps", type=int, default=4, help="dry-run steps per launch")
    p.add_argument("--nproc", type=int, default=2, help="dry-run ranks")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per configuration in part (b)")
    p.add_argument("--skip_dry_run", action="store_true", help="part (b) only")
    args = p.parse_args()
    args.widths = [(256, 2), (1024, 4)]
    if not os.environ.get("BAGEL_ROOT"):
        raise SystemExit("set BAGEL_ROOT to a BAGEL checkout: both parts run its Bagel")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads\n")
    if not args.skip_dry_run:
        part_a(args)
    part_b(args)


if __name__ == "__main__":
    main()
