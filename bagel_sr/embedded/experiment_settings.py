"""The default experiment's settings: its command-line arguments (the embedded loop's ``TrainConfig`` plus the
bench's own), the demo's pixel-loss defaults (the wrapper's conservative defaults with the overrides this bench
needs), the arms it trains, and the backbone and loop settings that the arguments ask for."""
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

from . import _compat  # noqa: F401

from ..config import DEMO_DEFAULTS, DEMO_TRAIN_OVERRIDES, PixelLossConfig, parse_flags, pixel_loss_arguments_class
from ..errors import BadInput
from ..names import check_names
from . import data
from .backbone import TinyBagelConfig
from .modes import parse_modes
from .train import TrainConfig, validate_train_config


def _demo_default(name: str, help: str):
    """A field whose default is the demo's override of its training loop's (``DEMO_TRAIN_OVERRIDES``)."""
    return field(default=DEMO_TRAIN_OVERRIDES[name], metadata={"help": help})


@dataclass
class ExperimentArguments(TrainConfig):
    # the demo's overrides of its loop's defaults (bagel_sr.config.DEMO_TRAIN_OVERRIDES)
    steps: int = _demo_default("steps", "Optimizer steps per arm.")
    timestep_shift: float = _demo_default(
        "timestep_shift", "Training timestep shift s: t = s*t/(1+(s-1)*t); below 1 puts more targets at low t.")
    t2i_ratio: float = _demo_default("t2i_ratio", "Share of unpaired text-to-image samples in a batch.")
    vae_cond_dropout_prob: float = _demo_default("vae_cond_dropout_prob", "Probability of dropping the condition image.")
    output_dir: str = field(default="outputs/embedded", metadata={"help": "Where metrics.json, grid.png, checkpoints go."})
    seeds: int = field(default=1, metadata={"help": "Repeat the experiment over this many seeds (seed, seed+1, ...)."})
    seed: int = field(default=0, metadata={"help": "First seed (model init, data order, noise)."})
    eval_split: str = field(default="heldout", metadata={"help": "'heldout' (report) or 'val' (for tuning)."})
    eval_ema: bool = field(default=True, metadata={"help": "Evaluate the EMA weights (else the raw weights)."})
    sample_steps: int = field(default=25, metadata={"help": "Euler steps of the sampler."})
    sample_timestep_shift: float = field(default=1.0, metadata={"help": "Timestep shift of the sampler schedule."})
    sample_modes: str = field(
        default="1:1:0,0.3:8:0,0.3:16:0,0.3:16:1,0.3:16:0:1",
        metadata={"help": "Inference modes measured for every arm, comma-separated START_T:NUM_SAMPLES:DC[:ONE_STEP] "
                          "(empty: only the stock sampler)."})
    term_arms: str = field(
        default="",
        metadata={"help": "More + pixel arms, ';'-separated, each with --pixel_loss_terms replaced (e.g. 'ssim:1;grad:1')."})
    # the backbone's size: TinyBagelConfig holds the defaults
    hidden_size: int = field(default=TinyBagelConfig.hidden_size, metadata={"help": "Backbone width."})
    num_hidden_layers: int = field(default=TinyBagelConfig.num_hidden_layers, metadata={"help": "Backbone depth."})
    num_attention_heads: int = field(default=TinyBagelConfig.num_attention_heads, metadata={"help": "Attention heads."})
    num_key_value_heads: int = field(default=TinyBagelConfig.num_key_value_heads, metadata={"help": "Key/value heads."})
    intermediate_size: int = field(default=TinyBagelConfig.intermediate_size, metadata={"help": "MLP width."})
    aligned_condition: bool = field(
        default=True,
        metadata={"help": "Add each target token's condition token (same grid cell) to its input embedding."})
    vae_dir: Optional[str] = field(default=None, metadata={"help": "VAE directory (default: the shipped one)."})
    save_checkpoints: bool = field(default=True, metadata={"help": "Write model/ema safetensors per arm."})
    grid_rows: int = field(default=8, metadata={"help": "Examples in grid.png."})
    lesion_images: int = field(
        default=16,
        metadata={"help": "Held-out patches with synthetic lesions that both arms restore (seed 0 only; 0: none)."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Redo a finished run in --output_dir (deletes only the files that run wrote there)."})



def arm_configs(pixel: PixelLossConfig, term_arms: str) -> Dict[str, PixelLossConfig]:
    """``{arm name: its pixel-loss settings}``: flow only (weight 0), + pixel, then one arm per ``--term_arms`` item.
    The pixel arms also measure the gradient norms of the terms on llm2vae every 10 steps (monitoring only)."""
    watched = dataclasses.replace(pixel, log_grad_norms_every=pixel.log_grad_norms_every or 10)
    arms = {"flow_only": dataclasses.replace(pixel, weight=0.0), "pixel": watched}
    for item in filter(None, (t.strip() for t in term_arms.split(";"))):
        name = f"terms={item}"
        if name in arms:
            raise BadInput(f"--term_arms: {item!r} appears twice")
        try:
            arms[name] = dataclasses.replace(watched, terms=item)
            arms[name].term_weights  # parses the terms, naming the flag on error
        except ValueError as exc:
            raise BadInput(f"--term_arms {item!r}: {exc}") from None
    return arms


def arm_label(arm: str, pixel: PixelLossConfig) -> str:
    if arm == "flow_only":
        return "flow only"
    terms = pixel.terms or pixel.loss_type
    return f"flow + pixel (w={pixel.weight:g}, {terms}, t<={pixel.max_t:g})"


def parse(argv: Optional[Sequence[str]] = None):
    classes = (ExperimentArguments, pixel_loss_arguments_class(defaults=DEMO_DEFAULTS))
    args, pixel_args = parse_flags(classes, sys.argv[1:] if argv is None else argv)
    if args.eval_split not in ("heldout", "val"):
        raise BadInput(f"--eval_split: got {args.eval_split!r}; allowed: 'heldout', 'val'")
    for name, low in (("seeds", 1), ("sample_steps", 1), ("grid_rows", 0), ("lesion_images", 0), ("hidden_size", 1),
                      ("num_hidden_layers", 1), ("num_attention_heads", 1), ("num_key_value_heads", 1),
                      ("intermediate_size", 1)):
        if getattr(args, name) < low:
            raise BadInput(f"--{name} {getattr(args, name)}: expected an integer >= {low}")
    validate_train_config(args)
    parse_modes(args.sample_modes)
    pixel = PixelLossConfig.from_namespace(pixel_args)
    arm_configs(pixel, args.term_arms)
    check_names("--pixel_loss_datasets", pixel.dataset_names, data.DATASET_NAMES)
    return args, pixel


def model_config_for(args: ExperimentArguments, tokenizer: data.WordTokenizer) -> TinyBagelConfig:
    """The backbone that ``args`` asks for."""
    return TinyBagelConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
        intermediate_size=args.intermediate_size, timestep_shift=args.timestep_shift,
        aligned_condition=args.aligned_condition,
    )


def train_config_for(args: ExperimentArguments) -> TrainConfig:
    """The training settings that ``args`` asks for (the fields the two share)."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
