"""A stand-in BAGEL checkout with the contract's names (the real one: tests marked ``bagel``), shared by the tests
of the patches, the registry and the monitoring: a training script, ``data.dataset_base``,
``modeling.bagel.qwen2_navit`` and ``data.dataset_info``, plus BAGEL's loop step re-expressed."""
import os
import types
from dataclasses import dataclass

import torch
from torch.nn.attention import sdpa_kernel
from transformers import HfArgumentParser

from bagel_sr.patches.context import PatchContext
from .contract_model import ContractModel, LinearDecoder


@dataclass
class TrainingArguments:
    mse_weight: float = 1.0
    ce_weight: float = 1.0
    timestep_shift: float = 1.0
    visual_gen: bool = True
    gradient_accumulation_steps: int = 1


class SimpleCustomBatch:
    """Like BAGEL's: keeps ``padded_images`` and ``batch_data_indexes`` as attributes, ``to_dict`` returns all."""

    def __init__(self, data):
        self.padded_images = data["padded_images"]
        self.batch_data_indexes = data.get("batch_data_indexes")
        self.rest = {k: v for k, v in data.items() if k not in ("padded_images", "batch_data_indexes")}

    def to_dict(self):
        return dict(self.rest, padded_images=self.padded_images, batch_data_indexes=self.batch_data_indexes)


class FSDPCheckpoint:
    """Like BAGEL's, as far as the patches use it: the loop loads the weights before FSDP wraps the model, saves each
    checkpoint through it, and resuming from ``.../0000004`` returns step 5."""

    @staticmethod
    def try_load_train_state(resume_from, optimizer, scheduler, fsdp_config):
        step = int(os.path.basename(os.path.normpath(resume_from))) + 1 if resume_from else 0
        return optimizer, scheduler, step, None

    @staticmethod
    def try_load_ckpt(resume_from, logger, model, ema_model=None, resume_from_ema=False):
        return model, ema_model

    @staticmethod
    def fsdp_save_ckpt(ckpt_dir, train_steps, model, ema_model, optimizer, scheduler, data_status, logger, fsdp_config):
        return None


def script():
    """``(train_module, batch_module)``: fresh fakes of the training script and ``data.dataset_base``."""
    module = types.ModuleType("fake_train")
    module.TrainingArguments = TrainingArguments
    module.HfArgumentParser = HfArgumentParser
    module.load_ae = lambda path=None: (LinearDecoder(), {"downsample": 8})
    module.Bagel = ContractModel
    module.main = lambda: None
    module.FSDPCheckpoint = type("FSDPCheckpoint", (FSDPCheckpoint,), {})  # fresh: patched per test
    module.torch, module.dist = torch, torch.distributed  # main() reaches CUDA and nccl through these names
    batch_module = types.ModuleType("fake_dataset_base")
    batch_module.SimpleCustomBatch = type("SimpleCustomBatch", (SimpleCustomBatch,), {})  # fresh: patched per test
    return module, batch_module


def navit_module(with_name: bool = True):
    """A ``modeling.bagel.qwen2_navit`` holding torch's ``sdpa_kernel`` (or not)."""
    module = types.ModuleType("fake_qwen2_navit")
    if with_name:
        module.sdpa_kernel = sdpa_kernel
    return module


def fsdp_module():
    """A ``train.fsdp_utils`` with the names the dry run replaces."""
    import torch.distributed.fsdp

    module = types.ModuleType("fake_fsdp_utils")
    module.torch = torch
    module.FullStateDictConfig = torch.distributed.fsdp.FullStateDictConfig
    module.init_device_mesh = lambda device_type, *a, **k: (device_type, a, k)
    module.FSDP = torch.distributed.fsdp.FullyShardedDataParallel
    return module


def dataset_info():
    """A ``data.dataset_info`` with one existing ``unified_edit`` entry."""
    mod = types.ModuleType("data.dataset_info")
    mod.DATASET_INFO = {"unified_edit": {"existing": {"data_dir": "x"}}, "t2i_pretrain": {}}
    mod.DATASET_REGISTRY = {"unified_edit": object}
    return mod


def context(**kwargs) -> PatchContext:
    """A :class:`PatchContext` over fresh fakes of every module a patch touches."""
    train_module, batch_module = script()
    parts = dict(train_module=train_module, batch_module=batch_module, navit_module=navit_module(),
                 dataset_info_module=dataset_info(), fsdp_module=fsdp_module())
    parts.update(kwargs)
    return PatchContext(**parts)


def loop_step(training_args, vae, model, batch, batch_cls=None, seed: int = 5):
    """BAGEL's loop for one micro-step (re-expressed): to_dict, pop, encode, forward, reduce, scale, backward."""
    data = model_inputs(batch, vae, batch_cls, seed)
    loss_dict = model(**data)
    loop_loss(loss_dict, data, training_args).backward()
    return loss_dict, data


def model_inputs(batch, vae, batch_cls=None, seed: int = 5):
    """What BAGEL's loop hands the model: ``batch_cls(batch).to_dict()`` (the patched class; None: the fake with
    ``pixel_loss_inputs`` added as the batch patch would), popped, ``padded_latent`` encoded; seeds the noise."""
    data = (batch_cls or SimpleCustomBatch)(batch).to_dict()
    if batch_cls is None:
        from bagel_sr.patches.training import PixelLossInputs

        data["pixel_loss_inputs"] = PixelLossInputs(data["padded_images"], None)
    data.pop("batch_data_indexes", None)
    images = data.pop("padded_images")
    with torch.no_grad():
        data["padded_latent"] = vae.encode(images)
    torch.manual_seed(seed)
    return data


def loop_loss(loss_dict, data, training_args):
    """The loop's flow loss: ``mse.mean(-1).sum() / N_tokens * mse_weight / GA``."""
    mse = loss_dict["mse"].mean(dim=-1).sum() / len(data["mse_loss_indexes"])
    return mse * training_args.mse_weight / training_args.gradient_accumulation_steps


def built_set(tmp_path) -> str:
    """A tiny built super-resolution set (4 patients of one 32x32 PNG); returns its registration file."""
    import numpy as np
    from PIL import Image

    from bagel_sr.data import build_dataset

    rng = np.random.default_rng(0)
    for p in ("p1", "p2", "p3", "p4"):
        (tmp_path / "imgs" / p).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(tmp_path / "imgs" / p / "a.png")
    summary = build_dataset({
        "name": "toy_sr", "output_dir": str(tmp_path / "out"), "seed": 1,
        "input": {"kind": "images", "path": str(tmp_path / "imgs")},
        "degradations": [{"name": "bicubic_downsample", "scale": 2}],
        "splits": {"fractions": {"train": 0.5, "val": 0.25, "test": 0.25}},
    }, progress=False)
    return str(summary.registration_file)
