"""Test helpers: a tiny random Bagel, a tiny BAGEL AutoEncoder and packed batches, all on CPU.

Not a test file. Tests that need a checkout use ``pytestmark = [pytest.mark.bagel, requires_bagel]`` (or the two
decorators) and ``import_bagel()``; nothing here touches the checkout until a function is called.

Conventions (BAGEL_CONTRACT.md): image sizes ``(h, w)`` are in latent tokens, one token = 16x16 pixels
(VAE downsample 8 x latent patch 2); a token holds ``2*2*16 = 64`` latent values. On CPU the language model runs
in bf16 under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (``run_forward`` does this); the VAE stays fp32.
"""
from __future__ import annotations

import importlib
import os
from types import SimpleNamespace
from typing import Any, Sequence

import pytest
import torch

from bagel_sr.patches.checkout import add_to_sys_path, find_checkout
from bagel_sr.patches.cpu import apply_cpu_compat

REQUIRES_BAGEL_REASON = "set BAGEL_ROOT to a BAGEL checkout to run"

TOKEN_PIXELS = 16  # pixels per latent token side
LATENT_PATCH = 2
Z_CHANNELS = 16
TOKEN_DIM = LATENT_PATCH * LATENT_PATCH * Z_CHANNELS  # 64
MAX_LATENT_SIZE = 8  # tokens per side the tiny model's latent position table covers
VOCAB_SIZE = 32
# Special token ids of the tiny vocabulary (PackedDataset reads these names from add_special_tokens).
SPECIAL_TOKENS = dict(bos_token_id=28, eos_token_id=29, start_of_image=30, end_of_image=31)
DATASET_NAMES = dict(edit="unified_edit", edit_dropped="unified_edit", chain="unified_edit", t2i="t2i_pretrain")
# Keys the training loop removes from the batch before calling the model.
NOT_FORWARD_KEYS = ("batch_data_indexes", "ce_loss_weights", "padded_images")


#: The checkout shapes the ``bagel`` tests run on where it matters (fixture ``checkout_shape`` in conftest.py):
#: ``$BAGEL_ROOT`` itself, and a fork generated from it (bagel_sr/testing/fork_checkout.py).
CHECKOUT_SHAPES = ("upstream", "fork")
_SHAPE = {"name": "upstream", "fork_root": None}


def upstream_root() -> str | None:
    """The checkout named by ``$BAGEL_ROOT``, or None."""
    return os.environ.get("BAGEL_ROOT") or None


def bagel_root() -> str | None:
    """The checkout the tests use now: ``$BAGEL_ROOT``, or the fork generated from it (:func:`use_checkout`)."""
    if upstream_root() is None:
        return None
    return _SHAPE["fork_root"] if _SHAPE["name"] == "fork" else upstream_root()


def checkout_shape() -> str:
    """``"upstream"`` or ``"fork"``: the shape :func:`bagel_root` names now."""
    return _SHAPE["name"]


def use_checkout(shape: str) -> str:
    """Switch the tests to ``shape`` (one of :data:`CHECKOUT_SHAPES`); returns its root.

    The fork is generated once per session (in a temporary folder).  Modules imported from the previous checkout
    leave ``sys.modules`` so that the next ``import_bagel()`` imports the new one.
    """
    import sys
    import tempfile

    from . import fork_checkout

    if shape not in CHECKOUT_SHAPES:
        raise ValueError(f"unknown checkout shape {shape!r}; use one of {CHECKOUT_SHAPES}")
    if shape == "fork" and _SHAPE["fork_root"] is None:
        _SHAPE["fork_root"] = str(fork_checkout.make_fork(upstream_root(), tempfile.mkdtemp(prefix="bagel_fork_")
                                                          + "/Bagel"))
    if shape != _SHAPE["name"]:
        old = os.path.realpath(bagel_root()) + os.sep
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None) or ""
            if os.path.realpath(file).startswith(old):
                del sys.modules[name]
        _SHAPE["name"] = shape
    return bagel_root()


requires_bagel = pytest.mark.skipif(upstream_root() is None, reason=REQUIRES_BAGEL_REASON)


def import_bagel() -> SimpleNamespace:
    """Apply the CPU patch, put ``$BAGEL_ROOT`` first on sys.path and import what the tests use.

    Returns a namespace: ``root``, ``bagel`` (modeling.bagel), ``qwen2_navit``, ``autoencoder``
    (modeling.autoencoder), ``data_utils`` (data.data_utils). The patch stays applied for the process.
    """
    root = find_checkout(bagel_root())
    add_to_sys_path(root)
    apply_cpu_compat()  # installs the flash_attn stand-in, then imports and patches modeling.bagel.qwen2_navit
    return SimpleNamespace(
        root=root,
        bagel=importlib.import_module("modeling.bagel"),
        qwen2_navit=importlib.import_module("modeling.bagel.qwen2_navit"),
        autoencoder=importlib.import_module("modeling.autoencoder"),
        data_utils=importlib.import_module("data.data_utils"),
    )


def import_training_script():
    """The checkout's training script, imported afresh (``sys.modules`` entry dropped first); the test is skipped
    when a package the script imports is not installed here, any other import failure is raised."""
    import sys

    from bagel_sr.patches import checkout

    root = import_bagel().root
    sys.modules.pop(checkout.TRAINING_MODULE_NAME, None)
    try:
        return checkout.import_training_module(root)
    except checkout.CheckoutError as err:
        if "not installed" in str(err):
            pytest.skip(f"the training script's dependencies are missing here: {err}")
        raise


# ------------------------------------------------------------------------------------------------------- models

def tiny_autoencoder_params():
    """``AutoEncoderParams`` of an 8x-downsampling VAE (4 levels -> 3 downsamples), 16 latent channels; ``ch`` must
    be a multiple of 32 (the VAE's GroupNorm has 32 groups)."""
    ae_mod = import_bagel().autoencoder
    return ae_mod.AutoEncoderParams(
        resolution=64, in_channels=3, downsample=8, ch=32, out_ch=3, ch_mult=[1, 1, 1, 1],
        num_res_blocks=1, z_channels=Z_CHANNELS, scale_factor=0.3611, shift_factor=0.1159,
    )


def build_tiny_autoencoder(seed: int = 0) -> torch.nn.Module:
    """BAGEL's ``modeling.autoencoder.AutoEncoder`` with tiny random weights, fp32, eval mode."""
    ae_mod = import_bagel().autoencoder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ae = ae_mod.AutoEncoder(tiny_autoencoder_params())
    return ae.float().eval().requires_grad_(False)


def tiny_llm_config(layer_module: str = "Qwen2MoTDecoderLayer"):
    """Qwen2Config of a 2-layer, hidden-64, 4-head (2 kv heads) language model, qk_norm on (training default)."""
    navit = import_bagel().qwen2_navit
    return navit.Qwen2Config(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        qk_norm=True, layer_module=layer_module, tie_word_embeddings=False, freeze_und=False,
    )


def build_tiny_bagel(
    seed: int = 0,
    layer_module: str = "Qwen2MoTDecoderLayer",
    timestep_shift: float = 1.0,
    cls: type | None = None,
    llm2vae_std: float = 0.0,
    visual_und: bool = False,
) -> torch.nn.Module:
    """A tiny random ``Bagel`` (or subclass ``cls``), bf16, train mode; generation only unless ``visual_und``
    (then with a 1-layer SigLIP, patch 14, as BAGEL's editing inference needs for the condition image).

    ``llm2vae_std > 0`` replaces BAGEL's zero init of ``llm2vae`` with N(0, std) so that gradients reach the
    language model on the first step (with the zero init only ``llm2vae`` itself gets a gradient).
    """
    mods = import_bagel()
    cls = cls or mods.bagel.Bagel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        language_model = mods.bagel.Qwen2ForCausalLM(tiny_llm_config(layer_module))
        vit_config = vit_model = None
        if visual_und:
            vit_config = mods.bagel.SiglipVisionConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=14,
                image_size=224, num_channels=3, rope=False,
            )
            vit_model = mods.bagel.SiglipVisionModel(vit_config)
        config = mods.bagel.BagelConfig(
            visual_gen=True, visual_und=visual_und, llm_config=language_model.config, vit_config=vit_config,
            vae_config=tiny_autoencoder_params(), latent_patch_size=LATENT_PATCH, max_latent_size=MAX_LATENT_SIZE,
            timestep_shift=timestep_shift, vit_max_num_patch_per_side=16,
        )
        model = cls(language_model, vit_model, config)
        if visual_und:
            model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config)
        if llm2vae_std > 0:
            torch.nn.init.normal_(model.llm2vae.weight, std=llm2vae_std)
    return model.to(torch.bfloat16).train()


# ------------------------------------------------------------------------------------------------------ batches

class _Packer:
    """Packs sample plans into one sequence the way BAGEL's ``PackedDataset.pack_sequence`` does (no ViT items,
    no text loss, no random CFG dropout: dropping is explicit in the spec)."""

    def __init__(self, data_utils, max_latent_size: int):
        self.du, self.max_latent_size = data_utils, max_latent_size
        self.curr = 0
        self.out = dict(sample_lens=[], packed_position_ids=[], nested_attention_masks=[], packed_text_ids=[],
                        packed_text_indexes=[], images=[], packed_latent_position_ids=[], vae_latent_shapes=[],
                        packed_vae_token_indexes=[], packed_timesteps=[], mse_loss_indexes=[])

    def pack(self, plan: list[dict]) -> None:
        """plan items: ``{"type": "text", "ids": [...]}``, ``{"type": "vae", "image": (3,H,W), "loss": 0|1,
        "timestep": float}`` (raw, targets only) or ``{"type": "dropped_vae"}``."""
        split_lens, attn_modes, rope, start = [], [], 0, self.curr
        for item in plan:
            if item["type"] == "dropped_vae":  # a condition removed for CFG keeps its rope slot
                rope += 1
                continue
            n, mode = self._text(item) if item["type"] == "text" else self._vae(item)
            self.out["packed_position_ids"].extend(range(rope, rope + n) if mode == "causal" else [rope] * n)
            rope += n if mode == "causal" else int(mode == "full")  # a noised target shares its rope id
            split_lens.append(n)
            attn_modes.append(mode)
        self.out["sample_lens"].append(self.curr - start)
        self.out["nested_attention_masks"].append(self.du.prepare_attention_mask_per_sample(split_lens, attn_modes))

    def _text(self, item) -> tuple[int, str]:
        ids = [SPECIAL_TOKENS["bos_token_id"], *item["ids"], SPECIAL_TOKENS["eos_token_id"]]
        self._add_text_tokens(ids)
        return len(ids), "causal"

    def _vae(self, item) -> tuple[int, str]:
        image = item["image"]
        h, w = image.shape[1] // TOKEN_PIXELS, image.shape[2] // TOKEN_PIXELS
        self._add_text_tokens([SPECIAL_TOKENS["start_of_image"]])
        self.out["images"].append(image)
        self.out["packed_latent_position_ids"].append(self.du.get_flattened_position_ids_extrapolate(
            image.shape[1], image.shape[2], TOKEN_PIXELS, max_num_patches_per_side=self.max_latent_size))
        self.out["vae_latent_shapes"].append((h, w))
        tokens = list(range(self.curr, self.curr + h * w))
        self.out["packed_vae_token_indexes"].extend(tokens)
        if item["loss"]:
            self.out["mse_loss_indexes"].extend(tokens)
        raw_t = float(item["timestep"]) if item["loss"] else float("-inf")
        self.out["packed_timesteps"].extend([raw_t] * (h * w))
        self.curr += h * w
        self._add_text_tokens([SPECIAL_TOKENS["end_of_image"]])
        return h * w + 2, "noise" if item["loss"] else "full"

    def _add_text_tokens(self, ids: list[int]) -> None:
        self.out["packed_text_ids"].extend(ids)
        self.out["packed_text_indexes"].extend(range(self.curr, self.curr + len(ids)))
        self.curr += len(ids)


def _random_image(hw: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    h, w = hw
    return torch.rand(3, h * TOKEN_PIXELS, w * TOKEN_PIXELS, generator=gen) * 2 - 1


def _random_text(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(2, SPECIAL_TOKENS["bos_token_id"], (n,), generator=gen).tolist()


def sample_plan(spec: dict, gen: torch.Generator) -> list[dict]:
    """Turn a sample spec into a packing plan with random images/text (see ``make_packed_batch``)."""
    kind, text_len = spec["kind"], spec.get("text_len", 3)
    timesteps = list(spec.get("timesteps", []))

    def target(hw):
        image = _random_image(hw, gen)
        raw_t = timesteps.pop(0) if timesteps else float(torch.randn((), generator=gen))
        return {"type": "vae", "image": image, "loss": 1, "timestep": raw_t}

    def text():
        return {"type": "text", "ids": _random_text(text_len, gen)}

    cond_hw = spec.get("cond_hw", (2, 2))
    if kind == "t2i":
        return [text(), target(spec.get("target_hw", (2, 2)))]
    if kind in ("edit", "edit_dropped"):
        cond = ({"type": "dropped_vae"} if kind == "edit_dropped"
                else {"type": "vae", "image": _random_image(cond_hw, gen), "loss": 0})
        return [cond, text(), target(spec.get("target_hw", cond_hw))]
    if kind == "chain":
        plan = [{"type": "vae", "image": _random_image(cond_hw, gen), "loss": 0}]
        target_hws = spec.get("target_hws", [cond_hw, cond_hw])
        for i, hw in enumerate(target_hws):
            plan += [text(), target(hw)]
            if i < len(target_hws) - 1:  # an intermediate result comes back as a clean condition
                plan.append({"type": "vae", "image": plan[-1]["image"].clone(), "loss": 0})
        return plan
    raise ValueError(f"unknown sample kind {kind!r}; use one of {sorted(DATASET_NAMES)}")


def make_packed_batch(specs: Sequence[dict], seed: int = 0, max_latent_size: int = MAX_LATENT_SIZE
                      ) -> dict[str, Any]:
    """A packed batch as ``PackedDataset`` + ``SimpleCustomBatch.to_dict()`` produce it (nested masks, no flex).

    specs, one per sample (sizes in tokens; one token = 16x16 pixels):
      ``{"kind": "edit", "cond_hw": (2,2), "target_hw": (2,2), "text_len": 3}``: condition, instruction, target;
      ``{"kind": "edit_dropped", ...}``: the same with the condition dropped for CFG (absent, keeps its rope slot);
      ``{"kind": "t2i", "target_hw": (2,3), "text_len": 3}``: caption, target;
      ``{"kind": "chain", "cond_hw": (2,2), "target_hws": [(2,2), (2,2)]}``: condition, then per step
      instruction + target, each intermediate target re-added as a clean condition after itself.
    Optional per spec: ``"timesteps"``: raw timesteps of its targets in order (else one N(0,1) draw per target),
    ``"dataset_name"``. Conditions get raw timestep -inf. Returns the forward kwargs plus ``padded_images``
    (N, 3, Hmax, Wmax) in [-1, 1], zero-padded bottom/right, and ``batch_data_indexes``.
    """
    mods = import_bagel()
    gen = torch.Generator().manual_seed(seed)
    packer = _Packer(mods.data_utils, max_latent_size)
    for spec in specs:
        packer.pack(sample_plan(spec, gen))
    return _to_batch(packer.out, [_data_index(spec) for spec in specs])


def _data_index(spec: dict) -> dict:
    return {"dataset_name": spec.get("dataset_name", DATASET_NAMES[spec["kind"]]), "kind": spec["kind"]}


def _to_batch(out: dict, data_indexes: list[dict]) -> dict[str, Any]:
    """Tensors and key order of ``PackedDataset.to_tensor`` followed by ``SimpleCustomBatch.to_dict``."""
    images = out["images"]
    batch = dict(
        sequence_length=sum(out["sample_lens"]),
        sample_lens=out["sample_lens"],
        packed_text_ids=torch.tensor(out["packed_text_ids"]),
        packed_text_indexes=torch.tensor(out["packed_text_indexes"]),
        packed_position_ids=torch.tensor(out["packed_position_ids"]),
        batch_data_indexes=data_indexes,
        nested_attention_masks=out["nested_attention_masks"],
    )
    if images:
        h_max = max(img.shape[1] for img in images)
        w_max = max(img.shape[2] for img in images)
        padded = torch.zeros(len(images), 3, h_max, w_max)
        for i, img in enumerate(images):
            padded[i, :, : img.shape[1], : img.shape[2]] = img
        batch.update(
            padded_images=padded,
            patchified_vae_latent_shapes=out["vae_latent_shapes"],
            packed_latent_position_ids=torch.cat(out["packed_latent_position_ids"]),
            packed_vae_token_indexes=torch.tensor(out["packed_vae_token_indexes"]),
        )
    if out["packed_timesteps"]:
        batch.update(packed_timesteps=torch.tensor(out["packed_timesteps"]),
                     mse_loss_indexes=torch.tensor(out["mse_loss_indexes"]))
    return batch


def num_target_tokens(batch: dict) -> int:
    """Number of tokens with a flow loss (rows of ``mse``)."""
    return len(batch["mse_loss_indexes"])


# --------------------------------------------------------------------------------------------------- the loop

def encode_batch(ae: torch.nn.Module, batch: dict, autocast: bool = True) -> dict[str, Any]:
    """What the training loop does before forward: ``padded_latent = ae.encode(padded_images)`` without grad
    (under bf16 autocast like the loop, unless ``autocast=False``). Returns a new dict: the batch with
    ``padded_latent`` added and ``padded_images`` kept (``run_forward`` leaves it out of the model call)."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        latent = ae.encode(batch["padded_images"])
    return {**batch, "padded_latent": latent}


def forward_kwargs(batch: dict, **extra) -> dict[str, Any]:
    """The keyword arguments the loop passes to the model: the batch minus ``NOT_FORWARD_KEYS``, plus ``extra``."""
    if "padded_latent" not in batch and "padded_latent" not in extra:
        raise KeyError("batch has no padded_latent: call encode_batch(ae, batch) first")
    kwargs = {k: v for k, v in batch.items() if k not in NOT_FORWARD_KEYS}
    kwargs.update(extra)
    return kwargs


def run_forward(model: torch.nn.Module, batch: dict, **extra) -> dict[str, Any]:
    """``model(**forward_kwargs(batch, **extra))`` under ``torch.autocast("cpu", dtype=torch.bfloat16)``."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(**forward_kwargs(batch, **extra))
