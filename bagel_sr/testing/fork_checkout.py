"""A fork-shaped BAGEL checkout, generated at test time from an upstream one by small, named edits.

Not a test file, and no BAGEL code lives here: :func:`make_fork` copies the checkout named by ``BAGEL_ROOT`` into a
folder and applies each edit of :data:`EDITS` (a regex replacement that must match exactly once, so an upstream
change that moves the code fails loudly, naming the edit).  The result has the shape of the research forks users
bring: a decoder that checkpoints its own levels, a ``forward`` with its own pixel/SSIM term and extra
outputs, a ``train/main.py`` with pixel flags and its own ``loss += ...`` but no ``--gradient_accumulation_steps``,
a ``DATASET_INFO`` without ``unified_edit`` (the registry still maps it) and an inferencer that ignores the input
size.  The fork's own term is a stand-in (an L1/L2 of ``z0_hat - z0`` on the gated target tokens): what matters to
the plugin is its signature, fields and outputs, not its maths.
"""
from __future__ import annotations

import pathlib
import re
import shutil
from dataclasses import dataclass

#: The training script of the fork (forks rename upstream's).
FORK_SCRIPT = "train/main.py"
UPSTREAM_SCRIPT = "train/pretrain_unified_navit.py"
#: Keys the fork's forward returns next to ``mse`` and ``ce``.
FORK_EXTRA_OUTPUTS = ("pixel", "ssim")
#: The fork's pixel-loss fields and their defaults.
FORK_FIELDS = {"pixel_loss_weight": 0.0, "pixel_loss_type": "l1", "pixel_loss_max_t": 0.5,
               "pixel_loss_paired_only": True, "pixel_loss_chunk": 4, "ssim_loss_weight": 0.0}
#: The fork's own data-set group (DATASET_INFO holds only it and upstream's non-editing groups).
FORK_GROUP = "medical_sr"


@dataclass(frozen=True)
class Edit:
    name: str
    path: str
    pattern: str
    replacement: str


_FORK_ARGS = "".join(
    f"    {name}: {type(value).__name__} = field(default={value!r}, metadata={{'help': 'fork: {name}'}})\n"
    for name, value in FORK_FIELDS.items())

_FORK_TERM = '''
        pixel = torch.zeros((), device=packed_text_embedding.device)
        ssim = torch.zeros((), device=packed_text_embedding.device)
        if pixel_loss_weight > 0 and padded_images is not None and self.config.visual_gen:
            noisy = (1 - packed_timesteps[:, None]) * packed_latent_clean + packed_timesteps[:, None] * noise
            t_target = packed_timesteps[has_mse][:, None]
            z0_hat = noisy[has_mse] - t_target * packed_mse_preds
            err = z0_hat - packed_latent_clean[has_mse]
            err = err.abs() if pixel_loss_type == "l1" else err ** 2
            gate = (t_target <= pixel_loss_max_t).to(err.dtype)
            pixel = (err * gate).sum() / (gate.sum() * err.shape[-1]).clamp(min=1)
        return dict(mse=mse, ce=ce, pixel=pixel, ssim=ssim)
'''

EDITS = (
    Edit("decoder_checkpoints_levels", "modeling/autoencoder.py",
         r"(?<=# upsampling\n)(?P<i>        )for i_level in reversed\(range\(self\.num_resolutions\)\):\n"
         r"(?P<body>(?:            .*\n)+?)(?=\n        # end)",
         "\\g<i>for i_level in reversed(range(self.num_resolutions)):\n"
         "            if torch.is_grad_enabled():\n"
         "                from torch.utils.checkpoint import checkpoint\n"
         "                h = checkpoint(self._up_level, h, i_level, use_reentrant=False)\n"
         "            else:\n"
         "                h = self._up_level(h, i_level)\n"
         "        h = self._end(h)\n        return h\n\n"
         "    def _up_level(self, h, i_level):\n"
         "        for i_block in range(self.num_res_blocks + 1):\n"
         "            h = self.up[i_level].block[i_block](h)\n"
         "        if i_level != 0:\n"
         "            h = self.up[i_level].upsample(h)\n"
         "        return h\n\n"
         "    def _end(self, h):"),
    Edit("forward_pixel_arguments", "modeling/bagel/bagel.py",
         r"(        mse_loss_indexes: Optional\[torch\.BoolTensor\] = None,\n)(    \) -> torch\.Tensor:)",
         "\\1        padded_images: Optional[torch.Tensor] = None,\n        pixel_loss_weight: float = 0.0,\n"
         "        pixel_loss_type: str = 'l1',\n        pixel_loss_max_t: float = 0.5,\n"
         "        pixel_loss_paired_only: bool = True,\n\\2"),
    Edit("forward_pixel_term_and_outputs", "modeling/bagel/bagel.py",
         r"\n        return dict\(mse=mse, ce=ce\)\n", _FORK_TERM),
    Edit("script_pixel_fields", FORK_SCRIPT,
         r"(class TrainingArguments:\n)", "\\1" + _FORK_ARGS),
    Edit("loop_keeps_padded_images", FORK_SCRIPT,
         r"vae_model\.encode\(data\.pop\('padded_images'\)\)", "vae_model.encode(data['padded_images'])"),
    Edit("loop_passes_pixel_arguments", FORK_SCRIPT,
         r"loss_dict = fsdp_model\(\*\*data\)",
         "loss_dict = fsdp_model(**data, pixel_loss_weight=training_args.pixel_loss_weight, "
         "pixel_loss_type=training_args.pixel_loss_type, pixel_loss_max_t=training_args.pixel_loss_max_t, "
         "pixel_loss_paired_only=training_args.pixel_loss_paired_only)"),
    Edit("loop_adds_its_pixel_loss", FORK_SCRIPT,
         r"(\n(?P<i>        )loss = loss / training_args\.gradient_accumulation_steps\n)",
         "\n\\g<i>if training_args.pixel_loss_weight > 0:\n"
         "\\g<i>    loss += loss_dict['pixel'] * training_args.pixel_loss_weight\n"
         "\\g<i>loss_dict['pixel'] = loss_dict['pixel'].detach()\n"
         "\\g<i>loss_dict['ssim'] = loss_dict['ssim'].detach()\\1"),
    Edit("no_gradient_accumulation_field", FORK_SCRIPT,
         r"    gradient_accumulation_steps: int = field\(\n(?:        .*\n)+?    \)\n", ""),
    Edit("no_gradient_accumulation_uses", FORK_SCRIPT,
         r"training_args\.gradient_accumulation_steps", "1"),
    Edit("dataset_info_own_groups", "data/dataset_info.py",
         r"    'unified_edit':\s*\{\n(?:.*\n)*?\t\t\},\n    \},\n",
         f"    '{FORK_GROUP}': {{}},\n"),
    Edit("inferencer_ignores_input_size", "inferencer.py",
         r"\n *image_shapes = input_term\.size\[::-1\]\n", "\n"),
)


def apply_edit(root: pathlib.Path, edit: Edit) -> None:
    """Apply one edit in place; fail naming it unless its pattern matches exactly once (``uses``: all matches)."""
    path = root / edit.path
    text = path.read_text()
    count = 0 if edit.name.endswith("_uses") else 1
    edited, n = re.subn(edit.pattern, edit.replacement, text, count=count)
    if n == 0 or (count == 1 and len(re.findall(edit.pattern, text)) != 1):
        raise AssertionError(f"fork edit {edit.name!r} does not match {edit.path} exactly once; upstream changed?")
    path.write_text(edited)


def make_fork(upstream: str | pathlib.Path, dest: str | pathlib.Path) -> pathlib.Path:
    """Copy the checkout ``upstream`` to ``dest`` and apply :data:`EDITS`; returns ``dest``."""
    dest = pathlib.Path(dest)
    shutil.copytree(upstream, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".git"))
    (dest / UPSTREAM_SCRIPT).rename(dest / FORK_SCRIPT)
    for edit in EDITS:
        apply_edit(dest, edit)
    return dest


# ------------------------------------------------------------------------------------- the DeepSpeed variant

#: The DeepSpeed port of upstream's training script that :func:`make_deepspeed_fork` writes next to it.
DEEPSPEED_SCRIPT = "train/main_deepspeed.py"

_DS_SETUP = '''    # DeepSpeed instead of FSDP, EMA and activation checkpointing: ZeRO-2, bf16 weights (fp32 master copy) as
    # FSDP's mixed precision has them; bf16 autocast is configured here because the engine's forward ignores an
    # outer torch.autocast; AdamW is DeepSpeed's, on torch's kernel.
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "gradient_clipping": training_args.max_grad_norm,
        "steps_per_print": 10 ** 9,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": True},
        "torch_autocast": {"enabled": True, "dtype": "bfloat16"},
        "optimizer": {"type": "AdamW", "params": {
            "lr": training_args.lr, "betas": [training_args.beta1, training_args.beta2],
            "eps": training_args.eps, "weight_decay": 0.0, "torch_adam": True}},
    }
    fsdp_config = None
    fsdp_model = model  # printed below; deepspeed.initialize replaces it with the engine
'''

_DS_STEP = '''        boundary = fsdp_model.is_gradient_accumulation_boundary()
        fsdp_model.step()
        if boundary:
            scheduler.step()
            total_norm = torch.tensor(float(fsdp_model.get_global_grad_norm() or 0.0), device=device)
'''

DEEPSPEED_EDITS = (
    Edit("ds_script_imports_deepspeed", DEEPSPEED_SCRIPT,
         r"(\nimport torch\.distributed as dist\n)", "\\1import deepspeed\n"),
    Edit("ds_config_replaces_fsdp_ema_and_checkpointing", DEEPSPEED_SCRIPT,
         r"    # Setup FSDP and load pretrained model:\n(?:.*\n)*?        check_fn=grad_checkpoint_check_fn\n    \)\n",
         _DS_SETUP),
    Edit("ds_initialize_replaces_optimizer", DEEPSPEED_SCRIPT,
         r"    optimizer = torch\.optim\.AdamW\(\n(?:        .*\n)+?    \)\n",
         "    fsdp_model, ds_optimizer, _, _ = deepspeed.initialize(\n"
         "        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config)\n"
         "    optimizer = ds_optimizer.optimizer  # torch's AdamW inside ZeRO-2: the scheduler and the lr log use it\n"),
    Edit("ds_no_ema_eval", DEEPSPEED_SCRIPT, r"    ema_model\.eval\(\)\n", ""),
    Edit("ds_engine_backward", DEEPSPEED_SCRIPT,
         r"(?<=\n)        loss\.backward\(\)\n",
         "        fsdp_model.backward(loss, scale_wrt_gas=False)  # the loop divides by the accumulation steps\n"),
    Edit("ds_engine_step", DEEPSPEED_SCRIPT,
         r"        if \(micro_step \+ 1\) % training_args\.gradient_accumulation_steps == 0:\n"
         r"(?:            .*\n)+?            optimizer\.zero_grad\(\)\n",
         _DS_STEP),
    Edit("ds_engine_save_checkpoint_uses", DEEPSPEED_SCRIPT,
         r"FSDPCheckpoint\.fsdp_save_ckpt\(\n(?:.*\n)*?\s*\)(?=\n)",
         "fsdp_model.save_checkpoint(training_args.checkpoint_dir, tag=f'{curr_step:07d}')"),
)


def make_deepspeed_fork(upstream: str | pathlib.Path, dest: str | pathlib.Path) -> pathlib.Path:
    """Copy the checkout ``upstream`` to ``dest`` and write :data:`DEEPSPEED_SCRIPT`, upstream's training script
    ported to DeepSpeed by :data:`DEEPSPEED_EDITS` (upstream's script stays); returns ``dest``.

    The port has no EMA and no resume (``engine.load_checkpoint`` is not wired); checkpoints are DeepSpeed's
    (``<checkpoint_dir>/<step>/mp_rank_00_model_states.pt`` and ZeRO shards)."""
    dest = pathlib.Path(dest)
    shutil.copytree(upstream, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".git"))
    shutil.copyfile(dest / UPSTREAM_SCRIPT, dest / DEEPSPEED_SCRIPT)
    for edit in DEEPSPEED_EDITS:
        apply_edit(dest, edit)
    return dest


# ------------------------------------------------------------ traits of the forks users bring to the dry run

#: The traits of the real fork :func:`make_trait_fork` gives a checkout (any subset; all at once by default).
TRAITS = ("old_base", "own_wrapper", "deepspeed_init", "layer_default")
#: A trait the dry run cannot map: the script asks CUDA for its free memory (``torch.cuda.mem_get_info``).
GPU_ONLY_TRAIT = "gpu_only_call"
GPU_ONLY_LINE = "free_memory, total_memory = torch.cuda.mem_get_info()"
#: The default ``--layer_module`` of a fork with ``layer_default``: a name its decoder-layer registry lacks.
FORK_LAYER_DEFAULT = "Qwen2MoTDecoderLayerMed"


def old_base_edits(script: str) -> tuple:
    """An older base than upstream HEAD: no MFU logging (``--peak_device_tflops``) and no ``--wandb_project``."""
    return (
        Edit("old_base_no_peak_tflops_field", script,
             r"    peak_device_tflops: float = field\(\n(?:        .*\n)+?    \)\n", ""),
        Edit("old_base_no_tflops_autodetect", script,
             r"    if training_args\.peak_device_tflops <= 0:\n(?:        .*\n)+", ""),
        Edit("old_base_no_tflops_log", script,
             r"        if training_args\.peak_device_tflops > 0:\n(?:            .*\n)        else:\n(?:            .*\n)", ""),
        Edit("old_base_no_tflops_uses", script, r"training_args\.peak_device_tflops", "0.0"),
        Edit("old_base_no_wandb_project_field", script,
             r"    wandb_project: str = field\(\n(?:        .*\n)+?    \)\n", ""),
        Edit("old_base_no_wandb_project_uses", script, r"project=training_args\.wandb_project", "project='bagel'"),
    )


_OWN_WRAPPER = '''

def fsdp_wrapper_with_ddp(original_model, fsdp_config, vae_model=None, ignored_modules=[]):
    # fork: places the model on its own GPU before FSDP; a VAE being fine-tuned is kept in sync by DDP
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    original_model = original_model.cuda(local_rank)
    if vae_model is not None:
        vae_model = vae_model.to(f"cuda:{local_rank}")
        if any(p.requires_grad for p in vae_model.parameters()):
            vae_model = DistributedDataParallel(vae_model, device_ids=[local_rank], output_device=local_rank)
            print(f"fork: the VAE is trained, kept in sync by DDP on device {local_rank}", flush=True)
    if fsdp_config.sharding_strategy == "HYBRID_SHARD":
        return fsdp_wrapper(original_model, fsdp_config, ignored_modules), vae_model
    layers = {Qwen2DecoderLayer, Qwen2MoEDecoderLayer, Qwen2MoTDecoderLayer, SiglipEncoderLayer,
              SiglipVisionTransformer, MLPconnector, TimestepEmbedder, PositionEmbedding}
    bf16 = torch.bfloat16
    options = dict(
        auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layers),
        mixed_precision=MixedPrecision(param_dtype=bf16, reduce_dtype=bf16, buffer_dtype=bf16),
        sharding_strategy=getattr(ShardingStrategy, fsdp_config.sharding_strategy),
        backward_prefetch=getattr(BackwardPrefetch, fsdp_config.backward_prefetch),
        cpu_offload=CPUOffload(fsdp_config.cpu_offload))
    wrapped = FSDP(original_model, ignored_modules=ignored_modules, device_id=torch.device("cuda", local_rank),
                   **options)
    return wrapped, vae_model
'''


def own_wrapper_edits(script: str) -> tuple:
    """The fork's own FSDP helper in ``train/fsdp_utils.py`` (``model.cuda(i)``, ``.to("cuda:N")``,
    ``torch.device("cuda", i)``, the VAE in DDP with ``device_ids`` when it is trained), used by ``script``, whose
    device is ``torch.device("cuda", LOCAL_RANK)``."""
    return (
        Edit("own_wrapper_imports_ddp", "train/fsdp_utils.py",
             r"(\nfrom torch\.distributed\.fsdp\.wrap import transformer_auto_wrap_policy\n)",
             "\\1from torch.nn.parallel import DistributedDataParallel\n"),
        Edit("own_wrapper_helper", "train/fsdp_utils.py", r"(?=\n\nclass FSDPCheckpoint:)", _OWN_WRAPPER.rstrip("\n")),
        Edit("own_wrapper_imported", script, r"(    fsdp_ema_setup, fsdp_ema_update,)(\n\))",
             "\\1 fsdp_wrapper_with_ddp,\\2"),
        Edit("own_wrapper_called", script, r"fsdp_model = fsdp_wrapper\(model, fsdp_config\)",
             "fsdp_model, vae_ddp = fsdp_wrapper_with_ddp(model, fsdp_config, "
             "vae_model if training_args.visual_gen else None)"),
        Edit("own_wrapper_cuda_device", script, r"device = dist\.get_rank\(\) % torch\.cuda\.device_count\(\)",
             "device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))"),
    )


def deepspeed_init_edits(script: str) -> tuple:
    """The DeepSpeed port starts its process group with ``deepspeed.init_distributed(dist_backend="nccl")`` and
    resumes with ``engine.load_checkpoint`` (so the dry run's second launch resumes it)."""
    return (
        Edit("ds_init_distributed", script, r'dist\.init_process_group\("nccl"\)',
             'deepspeed.init_distributed(dist_backend="nccl")'),
        Edit("ds_engine_load_checkpoint", script,
             r"        optimizer, scheduler, train_step, data_status = FSDPCheckpoint\.try_load_train_state\(\n"
             r"(?:            .*\n)+?        \)\n",
             "        train_step, data_status = 0, None\n"
             "        if resume_from is not None and os.path.exists(resume_from):\n"
             "            folder, tag = os.path.split(os.path.normpath(resume_from))\n"
             "            fsdp_model.load_checkpoint(folder, tag=tag)\n"
             "            train_step = int(tag) + 1\n"),
    )


def layer_default_edits() -> tuple:
    """The fork's default ``--layer_module`` is a name its decoder-layer registry lacks (users pass theirs)."""
    return (Edit("layer_default_not_registered", UPSTREAM_SCRIPT,
                 r'(    layer_module: str = field\(\n        default=)"Qwen2MoTDecoderLayer"',
                 f'\\1"{FORK_LAYER_DEFAULT}"'),)


def make_trait_fork(upstream: str | pathlib.Path, dest: str | pathlib.Path, traits=TRAITS) -> pathlib.Path:
    """Copy the checkout ``upstream`` to ``dest`` with the given :data:`TRAITS`; returns ``dest``.

    ``old_base`` applies to every training script; ``own_wrapper``, ``layer_default`` and ``gpu_only_call`` to
    upstream's script;
    ``deepspeed_init`` writes :data:`DEEPSPEED_SCRIPT` (upstream's script ported by :data:`DEEPSPEED_EDITS`, then
    :func:`deepspeed_init_edits`), which carries ``old_base`` as well. Every edit must match exactly once."""
    unknown = set(traits) - set(TRAITS) - {GPU_ONLY_TRAIT}
    if unknown:
        raise ValueError(f"unknown fork traits {sorted(unknown)}; known: {TRAITS + (GPU_ONLY_TRAIT,)}")
    dest = pathlib.Path(dest)
    shutil.copytree(upstream, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".git"))
    for edit in layer_default_edits() if "layer_default" in traits else ():  # before the DeepSpeed copy
        apply_edit(dest, edit)
    if GPU_ONLY_TRAIT in traits:
        apply_edit(dest, Edit("gpu_only_free_memory", UPSTREAM_SCRIPT, r"(\n(?P<i>    )torch\.cuda\.set_device\(device\)\n)",
                              f"\\1\\g<i>{GPU_ONLY_LINE}  # fork: sizes its batches to the free GPU memory\n"))
    edits: list = []
    if "deepspeed_init" in traits:
        shutil.copyfile(dest / UPSTREAM_SCRIPT, dest / DEEPSPEED_SCRIPT)
        edits += list(DEEPSPEED_EDITS) + list(deepspeed_init_edits(DEEPSPEED_SCRIPT))
    if "own_wrapper" in traits:
        edits += own_wrapper_edits(UPSTREAM_SCRIPT)
    if "old_base" in traits:
        scripts = [UPSTREAM_SCRIPT] + ([DEEPSPEED_SCRIPT] if "deepspeed_init" in traits else [])
        edits += [e for s in scripts for e in old_base_edits(s)]
    for edit in edits:
        apply_edit(dest, edit)
    return dest
