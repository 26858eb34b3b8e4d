"""What the pixel term costs in one training step of BAGEL at BAGEL-7B-MoT's widths (the GPU benchmark).

    python -m bagel_sr.gpu_check.step --bagel_root PATH [--device cuda] [--layers 2,4] [--tokens 16384]
                                        [--paired 4] [--image_px 512] [--repeats 5] [--json FILE]

The checkout's own ``Bagel`` (``Qwen2MoTDecoderLayer``, both experts) with random weights is built at the widths
of Qwen2.5-7B (hidden 3584, 28 heads, 4 KV heads, MLP 18944, vocabulary 152064) for each depth in ``--layers``,
with the checkout's ``load_ae`` VAE (FLUX geometry), in bf16 on one device. One packed micro-batch as BAGEL's
loader builds it (nested attention masks): ``--paired`` edit samples (clean condition image, instruction, target
image, all ``--image_px``), then text-to-image samples (instruction, unpaired target) up to ``--tokens`` tokens.
Every paired target is at t = 0.12, under the default gate ``max_t`` 0.3, so the term decodes
``min(paired, max_images)`` images: the worst case of the defaults (in training about 20% of targets pass).

A step is what the loop does per micro-batch: the VAE encode (no grad), the forward under bf16 autocast, the flow
loss (+ 0.05 x pixel), backward. Configurations, measured in alternation (round r starts at configuration r):
``flow`` (no pixel term), ``pixel`` (the wrapper's defaults: whole image, checkpointing on), ``pixel_crop``
(``--crop`` latent px + margin 4, checkpointing on), ``pixel_no_ckpt`` (whole image, checkpointing off). Time:
median of ``--repeats`` after ``--warmup`` rounds; peak: ``torch.cuda.max_memory_allocated`` of the step (none
on a CPU). ``--widths toy`` builds a tiny model (hidden 64, 64-px images, small VAE) for CPU tests of the code
paths. :mod:`bagel_sr.gpu_check.report` turns the JSON into the extrapolated 28-layer figures.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from bagel_sr.errors import ArgumentParser, cli_main
from bagel_sr.config import CONSERVATIVE_DEFAULTS, PixelLossConfig
from bagel_sr.extension import with_pixel_loss
from bagel_sr.patches import cpu, registry
from bagel_sr.patches.checkout import add_to_sys_path, find_checkout
from bagel_sr.patches.context import PatchContext

CONFIGS = ("flow", "pixel", "pixel_crop", "pixel_no_ckpt")
PAIRED_RAW_T = -2.0  # raw timestep of the paired targets: t = sigmoid(-2) = 0.12 <= default max_t 0.3
TOKEN_PIXELS = 16  # VAE downsample 8 x latent patch 2
GIB = 1024 ** 3


@dataclass(frozen=True)
class Widths:
    """Language-model widths, vocabulary and VAE geometry (``ae``: None = the checkout's ``load_ae``)."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    ae: Optional[Dict[str, Any]] = None
    text_len: int = 32


#: Qwen2.5-7B, the language model of BAGEL-7B-MoT; the VAE is the checkout's own (FLUX geometry).
SEVEN_B = Widths("7b", hidden=3584, heads=28, kv_heads=4, intermediate=18944, vocab=152064)
#: For CPU tests of the code paths: every width tiny, a 4-level VAE with ch 32.
TOY = Widths("toy", hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=64, text_len=4,
             ae=dict(resolution=64, in_channels=3, downsample=8, ch=32, out_ch=3, ch_mult=[1, 1, 1, 1],
                     num_res_blocks=1, z_channels=16, scale_factor=0.3611, shift_factor=0.1159))
WIDTHS = {w.name: w for w in (SEVEN_B, TOY)}


@dataclass
class Measured:
    """One configuration at one depth: step seconds per repeat, peak bytes per repeat, images decoded."""

    times: List[float] = field(default_factory=list)
    peaks: List[Optional[int]] = field(default_factory=list)
    images: List[float] = field(default_factory=list)

    def summary(self) -> Dict[str, Any]:
        peak = None if any(p is None for p in self.peaks) or not self.peaks else max(self.peaks) / GIB
        return dict(time_s=statistics.median(self.times), times_s=self.times, peak_gib=peak,
                    images=statistics.mean(self.images) if self.images else 0.0)


# ---------------------------------------------------------------------------------------------------- the model

def import_checkout(root: str) -> Dict[str, Any]:
    """Import the checkout's modelling code with the registry's ``cpu`` rows that hold here (the flash-attn
    stand-in when flash-attn is not installed; without CUDA, SDPA's math backend and torchvision's operator
    schemas). Returns the modules used, what serves flash-attn and the rows applied."""
    add_to_sys_path(find_checkout(root))
    handle = registry.apply(PatchContext(), stage="checkout", groups=("cpu",))
    return dict(bagel=importlib.import_module("modeling.bagel"),
                navit=importlib.import_module("modeling.bagel.qwen2_navit"),
                autoencoder=importlib.import_module("modeling.autoencoder"),
                data_utils=importlib.import_module("data.data_utils"),
                flash_attn="bagel-sr stand-in (flash-attn not installed)" if cpu.is_stand_in_installed()
                else "flash-attn " + getattr(sys.modules.get("flash_attn"), "__version__", "?"),
                compat=handle.applied)


def build_vae(mods: Dict[str, Any], widths: Widths, device: torch.device) -> tuple:
    """``(vae, params)``: the checkout's ``load_ae(None)`` (random weights) or ``AutoEncoder`` at ``widths.ae``;
    fp32, frozen, as the loop holds it."""
    ae_mod = mods["autoencoder"]
    torch.manual_seed(0)
    if widths.ae is None:
        ae, params = ae_mod.load_ae(None)
    else:
        params = ae_mod.AutoEncoderParams(**widths.ae)
        ae = ae_mod.AutoEncoder(params)
    return ae.to(device).float().eval().requires_grad_(False), params


def build_model(mods: Dict[str, Any], widths: Widths, layers: int, vae_params: Any, device: torch.device,
                max_latent_size: int) -> torch.nn.Module:
    """``with_pixel_loss(Bagel)`` with random weights at ``widths`` and ``layers`` decoder layers, bf16, train mode."""
    navit, bagel = mods["navit"], mods["bagel"]
    llm_config = navit.Qwen2Config(
        vocab_size=widths.vocab, hidden_size=widths.hidden, intermediate_size=widths.intermediate,
        num_hidden_layers=layers, num_attention_heads=widths.heads, num_key_value_heads=widths.kv_heads,
        max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, qk_norm=True,
        layer_module="Qwen2MoTDecoderLayer", tie_word_embeddings=False, freeze_und=False)
    torch.manual_seed(0)
    with torch.device(device):
        language_model = bagel.Qwen2ForCausalLM(llm_config)
        config = bagel.BagelConfig(visual_gen=True, visual_und=False, llm_config=llm_config, vae_config=vae_params,
                                   latent_patch_size=2, max_latent_size=max_latent_size, timestep_shift=1.0)
        model = with_pixel_loss(bagel.Bagel)(language_model, None, config)
        torch.nn.init.normal_(model.llm2vae.weight, std=0.02)  # BAGEL's zero init would stop gradients at llm2vae
    return model.to(torch.bfloat16).train()


# ---------------------------------------------------------------------------------------------------- the batch

def pack_batch(data_utils: Any, widths: Widths, tokens: int, paired: int, image_px: int, max_latent_size: int,
               device: torch.device, seed: int = 0) -> Dict[str, Any]:
    """A packed micro-batch as ``PackedDataset`` + ``SimpleCustomBatch.to_dict()`` give it (nested masks):
    ``paired`` edit samples [condition (clean), text, target], then text-to-image samples [text, target] until
    the sequence holds at least ``tokens`` tokens (at least one sample). Images ``(3, image_px, image_px)`` in
    [-1, 1]; the special tokens are the vocabulary's last four ids."""
    gen = torch.Generator().manual_seed(seed)
    bos, eos, soi, eoi = range(widths.vocab - 4, widths.vocab)
    side = image_px // TOKEN_PIXELS
    out: Dict[str, list] = {k: [] for k in ("sample_lens", "position_ids", "masks", "text_ids", "text_idx", "images",
                                            "latent_pos", "shapes", "vae_idx", "timesteps", "mse_idx", "indexes")}
    curr = 0

    def add_text(ids: List[int]) -> None:
        nonlocal curr
        out["text_ids"] += ids
        out["text_idx"] += range(curr, curr + len(ids))
        curr += len(ids)

    def add_image(target: bool, raw_t: float) -> int:
        nonlocal curr
        add_text([soi])
        out["images"].append(torch.rand(3, image_px, image_px, generator=gen) * 2 - 1)
        out["latent_pos"].append(data_utils.get_flattened_position_ids_extrapolate(
            image_px, image_px, TOKEN_PIXELS, max_num_patches_per_side=max_latent_size))
        out["shapes"].append((side, side))
        idx = list(range(curr, curr + side * side))
        out["vae_idx"] += idx
        out["timesteps"] += [raw_t if target else float("-inf")] * len(idx)
        if target:
            out["mse_idx"] += idx
        curr += len(idx)
        add_text([eoi])
        return len(idx) + 2

    n = 0
    while n < paired or curr < tokens or n == 0:
        edit, start, rope, splits, modes, positions = n < paired, curr, 0, [], [], []
        plan = (["cond", "text", "target"] if edit else ["text", "target"])
        for item in plan:
            if item == "text":
                ids = [bos] + torch.randint(0, widths.vocab - 4, (widths.text_len,), generator=gen).tolist() + [eos]
                add_text(ids)
                size, mode = len(ids), "causal"
            else:
                raw = (PAIRED_RAW_T if edit else float(torch.randn((), generator=gen))) if item == "target" else 0.0
                size, mode = add_image(item == "target", raw), ("noise" if item == "target" else "full")
            positions += range(rope, rope + size) if mode == "causal" else [rope] * size
            rope += size if mode == "causal" else int(mode == "full")
            splits.append(size)
            modes.append(mode)
        out["position_ids"] += positions
        out["sample_lens"].append(curr - start)
        out["masks"].append(data_utils.prepare_attention_mask_per_sample(splits, modes).to(device))
        out["indexes"].append({"dataset_name": "unified_edit" if edit else "t2i_pretrain"})
        n += 1

    def tensor(values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype, device=device)

    return dict(
        sequence_length=curr, sample_lens=out["sample_lens"], packed_text_ids=tensor(out["text_ids"]),
        packed_text_indexes=tensor(out["text_idx"]), packed_position_ids=tensor(out["position_ids"]),
        nested_attention_masks=out["masks"], patchified_vae_latent_shapes=out["shapes"],
        packed_latent_position_ids=torch.cat(out["latent_pos"]).to(device), packed_vae_token_indexes=tensor(out["vae_idx"]),
        packed_timesteps=tensor(out["timesteps"], torch.float32), mse_loss_indexes=tensor(out["mse_idx"]),
        padded_images=torch.stack(out["images"]).to(device), batch_data_indexes=out["indexes"])


# ------------------------------------------------------------------------------------------------ the stepping

def pixel_configs(crop: int) -> Dict[str, Optional[PixelLossConfig]]:
    """The measured configurations: None = flow only; the others start from the wrapper's defaults."""
    return {"flow": None,
            "pixel": PixelLossConfig(**CONSERVATIVE_DEFAULTS),
            "pixel_crop": PixelLossConfig(**CONSERVATIVE_DEFAULTS, crop=crop, crop_margin=4),
            "pixel_no_ckpt": PixelLossConfig(**CONSERVATIVE_DEFAULTS, checkpointing=False)}


def one_step(model: torch.nn.Module, vae: torch.nn.Module, batch: Dict[str, Any], config: Optional[PixelLossConfig],
             device: torch.device) -> tuple:
    """Encode, forward, flow (+ weight x pixel) loss, backward, as the loop does. Returns (seconds, peak bytes or
    None, images decoded)."""
    cuda = device.type == "cuda"
    if config is None:
        model.detach_pixel_loss()
    else:
        model.attach_pixel_loss(config, vae)
    kwargs = {k: v for k, v in batch.items() if k not in ("padded_images", "batch_data_indexes")}
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with torch.amp.autocast(device.type, dtype=torch.bfloat16):
        with torch.no_grad():
            kwargs["padded_latent"] = vae.encode(batch["padded_images"])
        extra = {} if config is None else dict(padded_images=batch["padded_images"],
                                               batch_data_indexes=batch["batch_data_indexes"])
        out = model(**kwargs, **extra)
    loss = out["mse"].float().mean(-1).sum() / len(batch["mse_loss_indexes"])
    if config is not None:
        loss = loss + config.weight * out["pixel"]
    loss.backward()
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(loss.detach()).item():
        raise RuntimeError(f"non-finite loss ({float(loss)}) in a step of configuration "
                           f"{'flow' if config is None else config.describe()}")
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return seconds, peak, float(out.get("pixel_images", 0.0)) if config is not None else 0.0


def measure_depth(mods: Dict[str, Any], widths: Widths, layers: int, vae: torch.nn.Module, vae_params: Any,
                  batch: Dict[str, Any], configs: Dict[str, Optional[PixelLossConfig]], device: torch.device,
                  warmup: int, repeats: int, max_latent_size: int, log=print) -> Dict[str, Any]:
    """All configurations at one depth, in alternation; checks that armed configurations decoded images."""
    model = build_model(mods, widths, layers, vae_params, device, max_latent_size)
    params = sum(p.numel() for p in model.parameters())
    names = list(configs)
    measured = {name: Measured() for name in names}
    for r in range(warmup + repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds, peak, images = one_step(model, vae, batch, configs[name], device)
            if r >= warmup:
                measured[name].times.append(seconds)
                measured[name].peaks.append(peak)
                measured[name].images.append(images)
        log(f"gpu_step: {layers} layers, round {r + 1}/{warmup + repeats} "
            + ("(warm-up)" if r < warmup else "") + " ".join(f"{n} {1000 * measured[n].times[-1]:.0f} ms"
                                                             for n in names if measured[n].times))
    for name, config in configs.items():
        if config is not None and not min(measured[name].images) > 0:
            raise RuntimeError(f"configuration {name} decoded no image: every paired target should pass the gate")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(layers=layers, parameters=params, configs={n: m.summary() for n, m in measured.items()})


def run(args: argparse.Namespace, log=print) -> Dict[str, Any]:
    """The benchmark; the JSON (written after each depth when ``args.json``) holds the setup and every depth."""
    device = torch.device(args.device)
    widths = WIDTHS[args.widths]
    mods = import_checkout(args.bagel_root)
    vae, vae_params = build_vae(mods, widths, device)
    max_latent_size = max(64, args.image_px // TOKEN_PIXELS)
    batch = pack_batch(mods["data_utils"], widths, args.tokens, args.paired, args.image_px, max_latent_size, device)
    crop = args.crop or max(1, args.image_px // 8 // 2)
    result: Dict[str, Any] = dict(
        widths=asdict(widths), device=str(device), flash_attn=mods["flash_attn"], compat=mods["compat"],
        tokens=batch["sequence_length"], samples=len(batch["sample_lens"]), paired=args.paired,
        image_px=args.image_px, crop=crop, crop_margin=4, warmup=args.warmup, repeats=args.repeats,
        configs=list(CONFIGS), depths=[])
    log(f"gpu_step: {widths.name} widths on {device}, {result['tokens']} tokens in {result['samples']} samples "
        f"({args.paired} paired, {args.image_px} px), attention: {mods['flash_attn']}")
    for layers in args.layers:
        result["depths"].append(measure_depth(mods, widths, layers, vae, vae_params, batch, pixel_configs(crop),
                                              device, args.warmup, args.repeats, max_latent_size, log))
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m bagel_sr.gpu_check.step", description=__doc__.split("\n\n")[0])
    p.add_argument("--bagel_root", default=os.environ.get("BAGEL_ROOT"), help="your BAGEL checkout (or BAGEL_ROOT)")
    p.add_argument("--device", default="cuda", help="torch device to run on (default cuda; cpu with --widths toy)")
    p.add_argument("--widths", choices=sorted(WIDTHS), default="7b", help="7b: BAGEL-7B-MoT's widths; toy: tiny")
    p.add_argument("--layers", default="2,4", help="comma-separated decoder depths to measure (default 2,4)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens of the packed micro-batch (default 16384)")
    p.add_argument("--paired", type=int, default=4, help="paired edit samples in it (default 4)")
    p.add_argument("--image_px", type=int, default=512, help="side of every image in pixels (default 512)")
    p.add_argument("--crop", type=int, default=0, help="latent crop side of pixel_crop (default: half the latent side)")
    p.add_argument("--warmup", type=int, default=2, help="rounds before timing (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--json", default=None, help="write the results to this file")
    args = p.parse_args(argv)
    if not args.bagel_root:
        p.error("--bagel_root PATH (or BAGEL_ROOT=PATH) is required: the model is the checkout's own Bagel")
    try:
        args.layers = sorted({int(x) for x in args.layers.split(",") if x.strip()})
    except ValueError:
        p.error(f"--layers {args.layers!r}: give comma-separated integers, e.g. 2,4")
    if not args.layers or min(args.layers) < 1:
        p.error("--layers: at least one depth, each >= 1")
    if args.image_px % TOKEN_PIXELS:
        p.error(f"--image_px {args.image_px}: must be a multiple of {TOKEN_PIXELS}")
    if args.repeats < 1 or args.warmup < 0 or args.paired < 1:
        p.error("--repeats >= 1, --warmup >= 0 and --paired >= 1 are required")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA device (torch {torch.__version__}); "
                "--device cpu --widths toy tests the code paths on a CPU")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    result = run(args)
    if not args.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
