"""Built-in paired data for the embedded experiment and a packer shaped like BAGEL's ``PackedDataset``.

Two kinds of samples:

- ``sr_pairs`` (editing-style, paired): a low-resolution image (bicubic down by 2 or 4 with anti-aliasing, mild
  Gaussian noise, bicubic back up) as a clean VAE *condition*, an instruction ("super resolve this ct slice by 4x"),
  and the high-resolution image as the VAE *target*;
- ``t2i`` (unpaired): a caption ("a ct slice") and a target image, no condition.

:func:`pack` lays samples out back to back as BAGEL's ``PackedDataset.pack_sequence`` does (see
BAGEL_CONTRACT.md, "The packed batch"): ``<bos> text <eos>`` splits are causal, a condition image
``<soi> tokens <eoi>`` is a full-attention split with raw timestep ``-inf``, a target image is a noise split with one
``N(0, 1)`` raw timestep; conditions and instructions are dropped with ``vae_cond_dropout_prob`` /
``text_cond_dropout_prob`` (BAGEL's defaults, 0.1 each), which trains the unconditional branch.
"""
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import sources

PATCH = 64
SCALES = (2, 4)
NOISE_SIGMA = (0.005, 0.02)  # std of the Gaussian noise added to the low-resolution image, in [0, 1] units
MIN_PATCH_STD = 0.04  # skip nearly flat crops (background)

NOUNS = {"CT": "slice", "MR": "slice", "NM": "scan", "fundus": "photo", "microscopy": "image", "phantom": "phantom"}
SR_TEMPLATES = (
    "super resolve this {mod} {noun} by {s}x",
    "upscale this {mod} {noun} {s} times",
    "restore the full resolution of this {s}x downsampled {mod} {noun}",
)
T2I_TEMPLATES = ("a {mod} {noun}", "an image of a {mod} {noun}", "generate a {mod} {noun}")


# -- tokenizer -----------------------------------------------------------------------------------------------------
class WordTokenizer:
    """A word-level vocabulary over the instruction templates, with BAGEL's special tokens.

    ``encode`` lower-cases and splits on spaces; unknown words map to ``<unk>``.
    """

    SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>", "<start_of_image>", "<end_of_image>")

    def __init__(self, words: Sequence[str]):
        self.vocab = list(self.SPECIALS) + sorted(set(words) - set(self.SPECIALS))
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.pad_token_id, self.unk_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2, 3
        self.start_of_image, self.end_of_image = 4, 5

    @classmethod
    def default(cls) -> "WordTokenizer":
        words = []
        for mod, noun in NOUNS.items():
            for tpl in SR_TEMPLATES + T2I_TEMPLATES:
                for s in SCALES:
                    words += tpl.format(mod=mod.lower(), noun=noun, s=s).split()
        return cls(words)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> List[int]:
        return [self.ids.get(w, self.unk_token_id) for w in text.lower().split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocab[i] for i in ids)


def sr_instruction(modality: str, scale: int, rng: np.random.Generator) -> str:
    tpl = SR_TEMPLATES[int(rng.integers(len(SR_TEMPLATES)))]
    return tpl.format(mod=modality.lower(), noun=NOUNS[modality], s=scale)


def t2i_caption(modality: str, rng: np.random.Generator) -> str:
    tpl = T2I_TEMPLATES[int(rng.integers(len(T2I_TEMPLATES)))]
    return tpl.format(mod=modality.lower(), noun=NOUNS[modality])


# -- images and degradations ---------------------------------------------------------------------------------------
def to_model_range(gray: torch.Tensor) -> torch.Tensor:
    """(H, W) or (1, H, W) in [0, 1] -> (3, H, W) in [-1, 1] (grayscale as RGB)."""
    g = gray.reshape(1, *gray.shape[-2:]).float()
    return (g * 2 - 1).expand(3, -1, -1).contiguous()


def to_unit_gray(image: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) in [-1, 1] -> (..., H, W) in [0, 1] (channel mean, clipped)."""
    return ((image.float().mean(-3) + 1) / 2).clamp(0, 1)


def degrade(hr: torch.Tensor, scale: int, sigma: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Low-resolution version of ``hr`` ((H, W) in [0, 1]) at the same size: anti-aliased bicubic down by ``scale``,
    Gaussian noise of std ``sigma``, bicubic up; clipped to [0, 1]."""
    h, w = hr.shape[-2:]
    lr = downsample(hr.reshape(1, 1, h, w).float(), scale)
    lr = lr + sigma * torch.randn(lr.shape, generator=generator)
    return upsample(lr, (h, w)).clamp(0, 1).reshape(h, w)


def downsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """The bench's down-sampling of (N, C, H, W): anti-aliased bicubic to (H // scale, W // scale)."""
    h, w = x.shape[-2:]
    return F.interpolate(x, size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False)


def upsample(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """The bench's up-sampling of (N, C, h, w) back to ``size``: bicubic."""
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


def _augment(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    patch = np.rot90(patch, int(rng.integers(4)))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    return np.ascontiguousarray(patch)


def random_patch(images: Sequence[sources.SourceImage], rng: np.random.Generator, size: int = PATCH,
                 phantom_prob: float = 0.2) -> Tuple[str, str, np.ndarray]:
    """A random, augmented ``size`` crop from the training images or (with ``phantom_prob``) a fresh train phantom."""
    for _ in range(20):
        if rng.random() < phantom_prob or not images:
            seed = int(rng.integers(sources.PHANTOM_SEED_BASE["train"], sources.PHANTOM_SEED_BASE["val"]))
            src = sources.SourceImage(f"phantom:{seed}", "phantom", sources.ellipse_phantom(seed))
        else:
            src = images[int(rng.integers(len(images)))]
        h, w = src.image.shape
        if h < size or w < size:
            continue
        top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        patch = src.image[top : top + size, left : left + size]
        if patch.std() >= MIN_PATCH_STD:
            return src.source, src.modality, _augment(patch, rng)
    return src.source, src.modality, _augment(patch, rng)


def fixed_patches(split: str, size: int = PATCH, per_source: int = 8) -> List[Tuple[str, str, np.ndarray]]:
    """Deterministic crops of an evaluation split: a half-overlapping grid over each image, then the ``per_source``
    busiest crops (by standard deviation) of each source (1 per phantom), in source and grid order."""
    by_source: Dict[str, List] = {}
    for k, src in enumerate(sources.load_split(split)):
        h, w = src.image.shape
        if h < size or w < size:
            continue
        step = size // 2
        tops = sorted(set(list(range(0, h - size + 1, step)) + [h - size]))
        lefts = sorted(set(list(range(0, w - size + 1, step)) + [w - size]))
        for t in tops:
            for l in lefts:
                crop = src.image[t : t + size, l : l + size]
                if crop.std() >= MIN_PATCH_STD:
                    by_source.setdefault(src.source, []).append((k, t, l, src.modality, crop))
    out = []
    for name, crops in by_source.items():
        cap = 1 if crops[0][3] == "phantom" else per_source
        keep = sorted(sorted(crops, key=lambda c: -float(c[4].std()))[:cap], key=lambda c: c[:3])
        out.extend((name, c[3], np.ascontiguousarray(c[4])) for c in keep)
    return out


# -- samples -------------------------------------------------------------------------------------------------------
#: The ``dataset_name`` of each kind of sample (what ``--pixel_loss_datasets`` can name).
DATASET_NAMES = ("sr_pairs", "t2i")


@dataclass
class Sample:
    """One packed-to-be sample. ``condition`` is None for t2i samples. Images are (3, H, W) in [-1, 1]."""

    kind: str  # "sr_pairs" or "t2i"
    text: str
    target: torch.Tensor
    condition: Optional[torch.Tensor] = None
    meta: Dict = field(default_factory=dict)


def make_pair(source: str, modality: str, hr: np.ndarray, scale: int, sigma: float, rng: np.random.Generator,
              generator: Optional[torch.Generator] = None) -> Sample:
    hr_t = torch.from_numpy(np.ascontiguousarray(hr, dtype=np.float32))
    lr_up = degrade(hr_t, scale, sigma, generator)
    return Sample("sr_pairs", sr_instruction(modality, scale, rng), to_model_range(hr_t), to_model_range(lr_up),
                  dict(source=source, modality=modality, scale=scale, sigma=sigma))


def make_t2i(source: str, modality: str, image: np.ndarray, rng: np.random.Generator) -> Sample:
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    return Sample("t2i", t2i_caption(modality, rng), to_model_range(img), None, dict(source=source, modality=modality))


class TrainStream:
    """An endless stream of training samples (a share ``t2i_ratio`` of them unpaired), reproducible from ``seed``."""

    def __init__(self, seed: int, split: str = "train", t2i_ratio: float = 0.25, size: int = PATCH,
                 phantom_prob: float = 0.2):
        self.images = sources.load_split(split)
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.t2i_ratio, self.size, self.phantom_prob = t2i_ratio, size, phantom_prob

    def __iter__(self) -> Iterator[Sample]:
        return self

    def __next__(self) -> Sample:
        source, modality, patch = random_patch(self.images, self.rng, self.size, self.phantom_prob)
        if self.rng.random() < self.t2i_ratio:
            return make_t2i(source, modality, patch, self.rng)
        scale = int(SCALES[int(self.rng.integers(len(SCALES)))])
        sigma = float(self.rng.uniform(*NOISE_SIGMA))
        return make_pair(source, modality, patch, scale, sigma, self.rng, self.generator)

    def take(self, n: int) -> List[Sample]:
        return [next(self) for _ in range(n)]


def eval_pairs(split: str, seed: int = 1234, size: int = PATCH) -> List[Sample]:
    """Fixed evaluation pairs: every fixed patch of the split at every scale, noise drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for source, modality, patch in fixed_patches(split, size):
        for scale in SCALES:
            sigma = float(np.mean(NOISE_SIGMA))
            out.append(make_pair(source, modality, patch, scale, sigma, rng, generator))
    return out


def eval_unpaired(split: str, seed: int = 4321, size: int = PATCH) -> List[Sample]:
    """Fixed unpaired (t2i) samples: every fixed patch of the split with a caption."""
    rng = np.random.default_rng(seed)
    return [make_t2i(source, modality, patch, rng) for source, modality, patch in fixed_patches(split, size)]


# -- packing -------------------------------------------------------------------------------------------------------
def attention_mask_per_sample(split_lens: Sequence[int], attn_modes: Sequence[str]) -> torch.Tensor:
    """Additive float mask (0 = attend, -inf = blocked) of one sample from its splits.

    Every token sees all earlier splits; within its split a ``causal`` token sees the tokens up to itself, a ``full``
    or ``noise`` token sees the whole split; and no token outside a ``noise`` split sees into it (a noisy target is
    visible only to itself).
    """
    n = int(sum(split_lens))
    allowed = torch.zeros(n, n, dtype=torch.bool)
    bounds = np.cumsum([0] + list(split_lens)).tolist()
    for (a, b), mode in zip(zip(bounds[:-1], bounds[1:]), attn_modes):
        if mode not in ("causal", "full", "noise"):
            raise ValueError(f"unknown attention mode {mode!r}")
        allowed[a:b, :a] = True
        allowed[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril() if mode == "causal" else True
    for (a, b), mode in zip(zip(bounds[:-1], bounds[1:]), attn_modes):
        if mode == "noise":
            allowed[:, a:b] = False
            allowed[a:b, a:b] = True
    return torch.zeros(n, n).masked_fill(~allowed, float("-inf"))


def latent_position_ids(h: int, w: int, max_latent_size: int) -> torch.Tensor:
    """Flattened 2-D positions of an ``h x w`` token grid in a ``max_latent_size``-wide table (row-major)."""
    return (torch.arange(h)[:, None] * max_latent_size + torch.arange(w)[None, :]).flatten()


def sequence_plan(sample: Sample) -> List[Tuple[str, object, int, int]]:
    """``(type, payload, loss, enable_cfg)`` items of a sample, in sequence order (as BAGEL's editing data)."""
    plan = []
    if sample.condition is not None:
        plan.append(("vae_image", sample.condition, 0, 1))
    plan.append(("text", sample.text, 0, 1))
    plan.append(("vae_image", sample.target, 1, 0))
    return plan


def pack(samples: Sequence[Sample], tokenizer: WordTokenizer, rng: Optional[np.random.Generator] = None, *,
         vae_cond_dropout_prob: float = 0.1, text_cond_dropout_prob: float = 0.1, vae_image_downsample: int = 16,
         max_latent_size: int = 32, use_flex: bool = False, return_refs: bool = False) -> Dict:
    """Pack samples into one batch with the keys of BAGEL's ``PackedDataset.to_tensor`` (generation keys only)
    plus ``padded_images`` and ``batch_data_indexes``.  ``return_refs`` adds ``vae_image_refs``: for every VAE
    image, ``(sample index, "condition" | "target")`` (used to look up cached latents; pop it before forward)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    st = dict(packed_text_ids=[], packed_text_indexes=[], packed_position_ids=[], sample_lens=[],
              nested_attention_masks=[], split_lens=[], attn_modes=[], vae_images=[], vae_latent_shapes=[],
              packed_latent_position_ids=[], packed_vae_token_indexes=[], packed_timesteps=[], mse_loss_indexes=[],
              refs=[])
    curr = 0
    for k, sample in enumerate(samples):
        split_lens, attn_modes, rope, start = [], [], 0, curr
        for kind, payload, loss, enable_cfg in sequence_plan(sample):
            if kind == "text":
                if enable_cfg and rng.random() < text_cond_dropout_prob:
                    continue
                ids = [tokenizer.bos_token_id] + tokenizer.encode(payload) + [tokenizer.eos_token_id]
                st["packed_text_ids"] += ids
                st["packed_text_indexes"] += list(range(curr, curr + len(ids)))
                st["packed_position_ids"] += list(range(rope, rope + len(ids)))
                curr, rope = curr + len(ids), rope + len(ids)
                split_lens.append(len(ids))
                attn_modes.append("causal")
                continue
            # a VAE image: <start_of_image> tokens <end_of_image>, one rope position for the whole split
            if enable_cfg and rng.random() < vae_cond_dropout_prob:
                rope += 1
                continue
            image = payload
            h, w = image.shape[1] // vae_image_downsample, image.shape[2] // vae_image_downsample
            st["vae_images"].append(image)
            st["refs"].append((k, "target" if loss else "condition"))
            st["vae_latent_shapes"].append((h, w))
            st["packed_latent_position_ids"].append(latent_position_ids(h, w, max_latent_size))
            st["packed_text_ids"].append(tokenizer.start_of_image)
            st["packed_text_indexes"].append(curr)
            tokens = list(range(curr + 1, curr + 1 + h * w))
            st["packed_vae_token_indexes"] += tokens
            if loss:
                st["mse_loss_indexes"] += tokens
                raw = float(rng.standard_normal())
            else:
                raw = float("-inf")
            st["packed_timesteps"] += [raw] * (h * w)
            st["packed_text_ids"].append(tokenizer.end_of_image)
            st["packed_text_indexes"].append(curr + 1 + h * w)
            st["packed_position_ids"] += [rope] * (h * w + 2)
            curr += h * w + 2
            if not loss:
                rope += 1
            split_lens.append(h * w + 2)
            attn_modes.append("noise" if loss else "full")
        st["sample_lens"].append(curr - start)
        if use_flex:
            st["split_lens"] += split_lens
            st["attn_modes"] += attn_modes
        else:
            st["nested_attention_masks"].append(attention_mask_per_sample(split_lens, attn_modes))

    images = st["vae_images"]
    hmax, wmax = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
    padded = torch.zeros(len(images), 3, hmax, wmax)
    for i, im in enumerate(images):
        padded[i, :, : im.shape[1], : im.shape[2]] = im
    batch = dict(
        sequence_length=curr,
        sample_lens=st["sample_lens"],
        packed_text_ids=torch.tensor(st["packed_text_ids"], dtype=torch.long),
        packed_text_indexes=torch.tensor(st["packed_text_indexes"], dtype=torch.long),
        packed_position_ids=torch.tensor(st["packed_position_ids"], dtype=torch.long),
        padded_images=padded,
        patchified_vae_latent_shapes=st["vae_latent_shapes"],
        packed_latent_position_ids=torch.cat(st["packed_latent_position_ids"]),
        packed_vae_token_indexes=torch.tensor(st["packed_vae_token_indexes"], dtype=torch.long),
        packed_timesteps=torch.tensor(st["packed_timesteps"], dtype=torch.float32),
        mse_loss_indexes=torch.tensor(st["mse_loss_indexes"], dtype=torch.long),
        batch_data_indexes=[dict(dataset_name=s.kind, data_indexes=[s.meta.get("source")]) for s in samples],
    )
    if return_refs:
        batch["vae_image_refs"] = st["refs"]
    if use_flex:
        batch["split_lens"], batch["attn_modes"] = st["split_lens"], st["attn_modes"]
    else:
        batch["nested_attention_masks"] = st["nested_attention_masks"]
    return batch


def model_inputs(batch: Dict) -> Dict:
    """The batch without the keys the loop pops before ``forward`` (``padded_images``, ``batch_data_indexes``)."""
    return {k: v for k, v in batch.items() if k not in ("padded_images", "batch_data_indexes", "vae_image_refs")}
