"""The GPU check's arithmetic and tables: extrapolate the benchmark (:mod:`.gpu_step`) to BAGEL-7B's 28 layers and
hold the pixel term's cost against the goal.

How the extrapolation is done. The flow-only step is measured at two depths ``a < b`` (the deepest and the
shallowest measured) and taken as linear in the depth: ``f(L) = f(a) + (L - a) * (f(b) - f(a)) / (b - a)``. The
layers' share grows with L; the rest (embedding, the VAE encode, ``vae2llm``/``llm2vae``) is the intercept. The
pixel term's cost ``p = t(config) - t(flow)`` does not pass through the decoder layers (its backward stops at
``v_hat``), so it should not grow with depth: it is checked between ``a`` and ``b`` (flat when it changes by at
most :data:`FLAT_TOLERANCE` of its value, or by at most :data:`FLAT_FLOOR_S`), and its mean over the depths is
set against ``f(28)``: ``ratio = p / f(28)``. Extra peak memory: ``peak(config) - peak(flow)`` at each depth, the
largest for the goal (the decode runs at the end of the forward, on top of activations that the flow-only
backward also holds, so it should not grow with depth either). The goal (:data:`GOAL_RATIO`, :data:`GOAL_EXTRA_GIB`) is checked for the wrapper's defaults (``pixel``).
The step measured is forward + backward without the optimizer, FSDP's communication or BAGEL's activation
checkpointing of the decoder layers, all of which make the real step longer: the ratio is an upper bound in that
respect; every paired target passes the gate, which makes it the worst case of the defaults.
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional

from bagel_sr import flow
from bagel_sr.config import CONSERVATIVE_DEFAULTS

TARGET_LAYERS = 28  # Qwen2.5-7B, BAGEL-7B-MoT's language model
GOAL_RATIO = 0.03  # pixel term time / full 7B step at the defaults
GOAL_EXTRA_GIB = 2.0  # extra peak memory at the defaults
FLAT_TOLERANCE = 0.25
FLAT_FLOOR_S = 0.002
ARMED = ("pixel", "pixel_crop", "pixel_no_ckpt")
LABELS = {"flow": "flow only", "pixel": "+ pixel, defaults (whole image, checkpointing)",
          "pixel_crop": "+ pixel, crop", "pixel_no_ckpt": "+ pixel, no checkpointing"}


def extrapolate(depths: List[Dict[str, Any]], target: int = TARGET_LAYERS) -> Dict[str, Any]:
    """The 28-layer figures from the benchmark's ``depths`` (see the module docstring). Needs two depths."""
    if len(depths) < 2:
        raise ValueError("the extrapolation needs two depths (e.g. --layers 2,4)")
    ordered = sorted(depths, key=lambda d: d["layers"])
    lo, hi = ordered[0], ordered[-1]
    f_lo, f_hi = lo["configs"]["flow"]["time_s"], hi["configs"]["flow"]["time_s"]
    slope = (f_hi - f_lo) / (hi["layers"] - lo["layers"])
    flow_target = f_lo + (target - lo["layers"]) * slope
    out: Dict[str, Any] = dict(layers=[lo["layers"], hi["layers"]], per_layer_s=slope, intercept_s=f_lo - lo["layers"] * slope,
                               flow_step_s=flow_target, target_layers=target, slope_positive=slope > 0, configs={})
    for name in ARMED:
        if name not in lo["configs"] or name not in hi["configs"]:
            continue
        costs = [d["configs"][name]["time_s"] - d["configs"]["flow"]["time_s"] for d in (lo, hi)]
        change = costs[1] - costs[0]
        flat = abs(change) <= max(FLAT_TOLERANCE * abs(costs[0]), FLAT_FLOOR_S)
        extras = [_extra(d, name) for d in ordered]
        extra = None if any(e is None for e in extras) else max(extras)
        cost = statistics.mean(costs)
        out["configs"][name] = dict(cost_s=cost, cost_by_depth_s=costs, flat=flat, extra_peak_gib=extra,
                                    extra_by_depth_gib=extras,
                                    ratio=cost / flow_target if flow_target > 0 else None,
                                    images=hi["configs"][name]["images"])
    return out


def _extra(depth: Dict[str, Any], name: str) -> Optional[float]:
    peak, base = depth["configs"][name]["peak_gib"], depth["configs"]["flow"]["peak_gib"]
    return None if peak is None or base is None else peak - base


def goals(extra: Dict[str, Any]) -> Dict[str, Any]:
    """The goal for the wrapper's defaults: ``ratio <= 3%`` and ``extra peak <= 2 GiB`` (None: not measurable).

    ``ratio_expected``: the ratio scaled by the share of targets the default gate admits in training
    (``timestep_shift`` 1), valid while the paired targets do not exceed ``max_images`` (the cost is then linear
    in the images decoded)."""
    pixel = extra["configs"].get("pixel", {})
    ratio, gib = pixel.get("ratio"), pixel.get("extra_peak_gib")
    share = flow.admitted_share(CONSERVATIVE_DEFAULTS["max_t"], 1.0)
    return dict(ratio=ratio, ratio_met=None if ratio is None or not extra["slope_positive"] else ratio <= GOAL_RATIO,
                extra_peak_gib=gib, extra_met=None if gib is None else gib <= GOAL_EXTRA_GIB,
                flat=pixel.get("flat"), gate_share=share,
                ratio_expected=None if ratio is None or not extra["slope_positive"] else ratio * share)


def _ms(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:.1f} ms"


def _gib(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f} GiB"


def _verdict(met: Optional[bool]) -> str:
    return "not measurable here" if met is None else ("MET" if met else "NOT MET")


def bench_markdown(bench: Dict[str, Any], extra: Optional[Dict[str, Any]]) -> List[str]:
    """The benchmark's table (one row per configuration and depth) and the 28-layer lines."""
    w = bench["widths"]
    lines = [f"{w['name']} widths (hidden {w['hidden']}, {w['heads']} heads, {w['kv_heads']} KV heads, MLP "
             f"{w['intermediate']}, MoT), bf16 on {bench['device']}; one micro-batch of {bench['tokens']} tokens in "
             f"{bench['samples']} samples, {bench['paired']} paired targets of {bench['image_px']} px, each at t = 0.12 "
             f"(all pass the gate); crop {bench['crop']} + margin {bench['crop_margin']} latent px; attention: "
             f"{bench['flash_attn']}; median of {bench['repeats']} alternated rounds after {bench['warmup']}.", "",
             "| layers | configuration | step (fwd+bwd) | peak memory | pixel term | extra peak | images decoded |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for depth in sorted(bench["depths"], key=lambda d: d["layers"]):
        flow = depth["configs"]["flow"]
        for name, c in depth["configs"].items():
            cost = None if name == "flow" else c["time_s"] - flow["time_s"]
            lines.append(f"| {depth['layers']} | {LABELS.get(name, name)} | {_ms(c['time_s'])} | {_gib(c['peak_gib'])} "
                         f"| {'' if cost is None else _ms(cost)} | {'' if name == 'flow' else _gib(_extra(depth, name))} "
                         f"| {c['images']:.0f} |")
    if extra is None:
        lines += ["", "28-layer extrapolation: not possible (needs two depths)."]
        return lines
    g = goals(extra)
    lo, hi = extra["layers"]
    lines += ["", f"Flow-only step extrapolated to {extra['target_layers']} layers (linear in depth through {lo} and "
              f"{hi} layers: {_ms(extra['per_layer_s'])} per layer + {_ms(extra['intercept_s'])}): "
              f"**{_ms(extra['flow_step_s'])}**" + ("" if extra["slope_positive"] else
                                                    " (unreliable: the deeper model was not slower)"), "",
              f"| configuration | pixel term ({lo} / {hi} layers) | flat in depth | / {extra['target_layers']}-layer step "
              f"| extra peak ({lo} / {hi} layers) |", "|---|---:|---|---:|---:|"]
    for name, c in extra["configs"].items():
        ratio = "n/a" if c["ratio"] is None else f"{100 * c['ratio']:.2f}%"
        extras = c.get("extra_by_depth_gib") or [None, None]
        lines.append(f"| {LABELS[name]} | {_ms(c['cost_by_depth_s'][0])} / {_ms(c['cost_by_depth_s'][1])} | "
                     f"{'yes' if c['flat'] else 'NO'} | {ratio} | {_gib(extras[0])} / {_gib(extras[-1])} |")
    ratio = "n/a" if g["ratio"] is None else f"{100 * g['ratio']:.2f}%"
    lines += ["", f"Goal at the defaults: time {ratio} of the {extra['target_layers']}-layer step (<= {100 * GOAL_RATIO:.0f}%): "
              f"{_verdict(g['ratio_met'])}; extra peak {_gib(g['extra_peak_gib'])} (<= {GOAL_EXTRA_GIB:.0f} GiB): "
              f"{_verdict(g['extra_met'])}."]
    if g["ratio_expected"] is not None:
        lines.append(f"This is the worst case (every paired target decoded). In training the default gate admits "
                     f"{100 * g['gate_share']:.0f}% of targets (timestep_shift 1), so the expected time is about "
                     f"{100 * g['ratio_expected']:.2f}% of the step.")
    return lines


def report_markdown(result: Dict[str, Any]) -> str:
    """The whole check as markdown: environment, the CUDA run of ``main()``, the benchmark."""
    env = result["environment"]
    lines = ["# GPU check", "", "## Environment", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    smoke = result.get("smoke")
    lines += ["", "## The checkout's main() on " + result["device"], ""]
    if smoke is None:
        lines.append("not run")
    else:
        lines.append(f"{'OK' if smoke['ok'] else 'FAILED'} ({smoke['seconds']:.0f} s): {smoke['line']}")
        lines += [f"- {note}" for note in smoke.get("checks", [])]
    lines += ["", "## Cost of the pixel term", ""]
    bench = result.get("bench")
    if bench is None:
        lines.append("not run")
    elif bench.get("error"):
        lines.append(f"FAILED: {bench['error']}")
    if bench and bench.get("depths"):
        lines += bench_markdown(bench, result.get("extrapolation"))
    return "\n".join(lines) + "\n"
