"""Every pixel-loss setting in one dataclass: its default, its CLI flag (``--pixel_loss_<field>``) and its validation.

The dataclass is usable directly (``PixelLossConfig(weight=0.05)``) and its flags are parsed with
``transformers.HfArgumentParser`` through :func:`pixel_loss_arguments_class`, which is how the flags join a
BAGEL training script's ``TrainingArguments``.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence

from .errors import UsageError, UserErrorsParser, one_line

FLAG_PREFIX = "pixel_loss_"
LOSS_TYPES = ("l2", "l1", "charbonnier")
#: Other spellings of a loss type (forks' flags, e.g. ``--pixel_loss_type mse``), read as ours.
LOSS_TYPE_ALIASES = {"mse": "l2", "mae": "l1"}
#: Fidelity terms that compare structure (bagel_sr/fidelity_terms.py); their gradient is bounded by L2's.
STRUCTURAL_TERMS = ("ssim", "grad", "lpl")
TERM_NAMES = LOSS_TYPES + STRUCTURAL_TERMS
#: A term's weight when ``--pixel_loss_terms`` names it without one (``ssim`` means ``ssim:0.1``).
DEFAULT_TERM_WEIGHTS = {"l2": 1.0, "l1": 1.0, "charbonnier": 1.0, "ssim": 0.1, "grad": 0.1, "lpl": 0.05}
SCHEDULES = ("hard", "ramp")
DECODE_DTYPES = ("autocast", "fp32")

# -- the table of defaults: where a run's settings differ from the dataclasses' own, in one place ----------------
#: The wrapper's pixel-loss settings (a real BAGEL) unless the user gives the flag; PixelLossConfig's own
#: defaults are off (weight 0).
CONSERVATIVE_DEFAULTS = {"weight": 0.05, "loss_type": "l2", "max_t": 0.3, "paired_only": True}
#: The embedded demo's overrides of the wrapper's pixel-loss settings: its cost controls (on its tiny model one
#: decoder pass costs about a training step: one image per micro-batch, a 4x4-latent crop without margin, no
#: recomputation).
DEMO_PIXEL_OVERRIDES = {"checkpointing": False, "max_images": 1, "crop": 4, "crop_margin": 0}
#: The embedded demo's pixel-loss settings: the wrapper's with the demo's overrides.
DEMO_DEFAULTS = {**CONSERVATIVE_DEFAULTS, **DEMO_PIXEL_OVERRIDES}
#: The embedded demo's overrides of its training loop's own defaults (``bagel_sr.embedded.train.TrainConfig``).
DEMO_TRAIN_OVERRIDES = {"steps": 2800, "timestep_shift": 0.4, "t2i_ratio": 0.1, "vae_cond_dropout_prob": 0.0}


@dataclass
class PixelLossConfig:
    """Settings of the pixel-fidelity term ``L = L_flow + weight * L_pix``.

    ``weight`` 0 means off: no hooks, no decode, the stock model bit for bit.
    """

    weight: float = field(default=0.0, metadata={"help": "Weight lambda of the pixel term (0 = off)."})
    loss_type: str = field(default="l2", metadata={"help": f"Pixel loss: one of {', '.join(LOSS_TYPES)} (aliases: mse = l2, mae = l1)."})
    terms: Optional[str] = field(
        default=None,
        metadata={"help": f"Fidelity terms and their weights, e.g. 'l2:1,ssim:0.1' (names: {', '.join(TERM_NAMES)}); "
                          "unset: --pixel_loss_type alone."},
    )
    term_grad_bound: float = field(
        default=1.0,
        metadata={"help": "Clip each structural term's (ssim, grad, lpl) gradient at v_hat to at most this times the L2 term's."},
    )
    lpl_outlier_quantile: float = field(
        default=0.0,
        metadata={"help": "lpl: per layer, ignore target feature values above this top quantile of |standardised| "
                          "(0 = no mask)."},
    )
    charbonnier_eps: float = field(default=1e-3, metadata={"help": "Epsilon of the Charbonnier loss."})
    max_t: float = field(default=0.3, metadata={"help": "Largest flow time t (0 = clean, 1 = noise) that gets the term, in (0, 1]."})
    schedule: str = field(
        default="hard",
        metadata={"help": "Weight over t: 'hard' (1 for t <= max_t) or 'ramp' (max(0, (max_t - t) / max_t))."},
    )
    paired_only: bool = field(
        default=True,
        metadata={"help": "Only targets whose sample holds a clean VAE condition image before them."},
    )
    max_images: int = field(default=4, metadata={"help": "At most this many images decoded per micro-batch (0 = no limit)."})
    crop: int = field(
        default=0,
        metadata={"help": "Random latent crop side in latent pixels (0 = whole image); the loss uses the inner window."},
    )
    crop_margin: int = field(default=4, metadata={"help": "Latent pixels decoded around the crop and then discarded."})
    checkpointing: bool = field(default=True, metadata={"help": "Activation checkpointing of the VAE decoder per block."})
    decode_dtype: str = field(
        default="autocast",
        metadata={"help": f"Decode under the loop's autocast ('autocast') or in float32 ('fp32')."},
    )
    datasets: Optional[str] = field(
        default=None,
        metadata={"help": "Comma-separated dataset names (from batch_data_indexes) that get the term; unset = all."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the image choice and crops (combined with rank and step)."})
    warmup_steps: int = field(default=0, metadata={"help": "Ramp the weight linearly from 0 over this many optimizer steps."})
    log_grad_norms_every: int = field(
        default=0,
        metadata={"help": "Every N steps log the gradient norms of the flow and weighted pixel terms on llm2vae (0 = never)."},
    )
    adaptive_weight: bool = field(
        default=False,
        metadata={"help": "Scale the weight by ||grad L_flow|| / ||grad L_pix|| on llm2vae (detached, clamped)."},
    )
    adaptive_weight_max: float = field(default=10.0, metadata={"help": "Clamp of the adaptive factor."})

    def __post_init__(self) -> None:
        self.loss_type = LOSS_TYPE_ALIASES.get(self.loss_type, self.loss_type)
        self.validate()

    # -- validation -------------------------------------------------------------------------------------------
    def validate(self) -> "PixelLossConfig":
        """Raise ``ValueError`` naming the flag, the value and what is allowed."""
        _check(self.weight >= 0 and _finite(self.weight), "weight", self.weight, "a finite number >= 0 (0 turns it off)")
        _check(self.loss_type in LOSS_TYPES, "loss_type", self.loss_type,
               f"one of {LOSS_TYPES} (or the aliases {', '.join(f'{a} = {b}' for a, b in LOSS_TYPE_ALIASES.items())})")
        self.term_weights  # parses --pixel_loss_terms (raises naming the flag)
        _check(self.term_grad_bound > 0 and _finite(self.term_grad_bound), "term_grad_bound", self.term_grad_bound,
               "a finite number > 0")
        _check(0 <= self.lpl_outlier_quantile < 1, "lpl_outlier_quantile", self.lpl_outlier_quantile,
               "a number in [0, 1)")
        _check(self.charbonnier_eps > 0, "charbonnier_eps", self.charbonnier_eps, "a number > 0")
        _check(0 < self.max_t <= 1, "max_t", self.max_t, "a number in (0, 1]")
        _check(self.schedule in SCHEDULES, "schedule", self.schedule, f"one of {SCHEDULES}")
        _check(self.max_images >= 0, "max_images", self.max_images, "an integer >= 0 (0 = no limit)")
        _check(self.crop >= 0, "crop", self.crop, "an integer >= 0 (0 = whole image)")
        _check(self.crop_margin >= 0, "crop_margin", self.crop_margin, "an integer >= 0")
        _check(self.decode_dtype in DECODE_DTYPES, "decode_dtype", self.decode_dtype, f"one of {DECODE_DTYPES}")
        _check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")
        _check(self.log_grad_norms_every >= 0, "log_grad_norms_every", self.log_grad_norms_every, "an integer >= 0")
        _check(self.adaptive_weight_max > 0, "adaptive_weight_max", self.adaptive_weight_max, "a number > 0")
        return self

    # -- conveniences -----------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.weight > 0

    @property
    def term_weights(self) -> Dict[str, float]:
        """``{term: relative weight}`` in the flag's order; unset ``terms`` = ``{loss_type: 1.0}`` (today's term)."""
        text = "" if self.terms is None else str(self.terms).strip()
        if not text:
            return {self.loss_type: 1.0}
        allowed = f"comma-separated name[:weight] with names in {TERM_NAMES}, weights >= 0, at least one > 0"
        out: Dict[str, float] = {}
        for item in text.split(","):
            name, _, weight = item.strip().partition(":")
            name = name.strip()
            _check(name in TERM_NAMES and name not in out, "terms", self.terms, allowed + ", each once")
            try:
                out[name] = float(weight) if weight.strip() else DEFAULT_TERM_WEIGHTS[name]
            except ValueError:
                _check(False, "terms", self.terms, allowed)
            _check(out[name] >= 0 and _finite(out[name]), "terms", self.terms, allowed)
        _check(any(w > 0 for w in out.values()), "terms", self.terms, allowed)
        return out

    @property
    def dataset_names(self) -> Optional[frozenset]:
        if self.datasets is None or str(self.datasets).strip() == "":
            return None
        return frozenset(name.strip() for name in str(self.datasets).split(",") if name.strip())

    def to_flags(self) -> dict:
        """``{"pixel_loss_weight": 0.05, "pixel_loss_type": "l2", ...}``: the settings under their flag names."""
        return {flag_name(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_namespace(cls, args: Any) -> "PixelLossConfig":
        """Build from any object carrying ``pixel_loss_<field>`` attributes (e.g. parsed TrainingArguments)."""
        values = {}
        for f in dataclasses.fields(cls):
            name = flag_name(f.name)
            if hasattr(args, name):
                values[f.name] = getattr(args, name)
        return cls(**values)

    def describe(self) -> str:
        """One line per setting, for the start-up banner."""
        return "\n".join(f"  --{k} {v}" for k, v in self.to_flags().items())


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


def flag_name(field_name: str) -> str:
    """The CLI flag (without ``--``) of a field: ``pixel_loss_<field>``; ``loss_type`` is ``pixel_loss_type``."""
    return FLAG_PREFIX + ("type" if field_name == "loss_type" else field_name)


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"--{flag_name(name)}: got {value!r}; allowed: {allowed}.")


def pixel_loss_fields(defaults: Optional[Mapping[str, Any]] = None) -> list:
    """``(name, type, dataclasses.field)`` triples of the ``pixel_loss_*`` flags, for ``make_dataclass``.

    ``defaults``: field name -> default replacing :class:`PixelLossConfig`'s (e.g. :data:`CONSERVATIVE_DEFAULTS`).
    """
    defaults = dict(defaults or {})
    unknown = set(defaults) - {f.name for f in dataclasses.fields(PixelLossConfig)}
    if unknown:
        raise ValueError(f"unknown pixel-loss settings {sorted(unknown)}; allowed: the fields of PixelLossConfig")
    PixelLossConfig(**defaults)  # the defaults themselves must be valid
    out = []
    for f in dataclasses.fields(PixelLossConfig):
        default = defaults.get(f.name, f.default)
        out.append((flag_name(f.name), f.type, field(default=default, metadata=f.metadata)))
    return out


def parse_flags(classes: Any, words: Sequence[str]) -> tuple:
    """``words`` parsed into ``classes`` (dataclasses, as ``transformers.HfArgumentParser`` takes them); a wrong,
    unknown or invalid flag raises :class:`~bagel_sr.errors.UsageError` with one line."""
    from transformers import HfArgumentParser  # the parser only when flags are parsed (importing it takes seconds)

    parser = type("FlagParser", (UserErrorsParser, HfArgumentParser), {})(classes)
    try:
        return tuple(parser.parse_args_into_dataclasses(args=list(words), return_remaining_strings=False))
    except ValueError as err:
        raise UsageError(one_line(str(err))) from None


def pixel_loss_arguments_class(base: Optional[type] = None, name: str = "PixelLossArguments",
                               defaults: Optional[Mapping[str, Any]] = None) -> type:
    """A dataclass holding the ``pixel_loss_*`` flags, subclassing ``base`` (e.g. a script's TrainingArguments).

    ``defaults`` replaces the flags' defaults (the wrapper passes :data:`CONSERVATIVE_DEFAULTS`; ``--help`` shows
    them).  Validation runs in ``__post_init__`` (after the base's), so ``HfArgumentParser`` rejects bad values.
    """
    bases = (base,) if base is not None else ()

    def __post_init__(self):
        parent = getattr(super(cls, self), "__post_init__", None)
        if parent is not None:
            parent()
        PixelLossConfig.from_namespace(self)

    cls = dataclasses.make_dataclass(name, pixel_loss_fields(defaults), bases=bases, namespace={"__post_init__": __post_init__})
    if base is not None:
        cls.__module__ = base.__module__
        cls.__qualname__ = base.__qualname__
    return cls
