"""bagel-sr: pixel-fidelity losses for BAGEL's rectified-flow training (a plugin; BAGEL itself is imported
from the user's checkout at run time)."""
from setuptools import setup

DATA = ["pillow>=10", "tqdm>=4.66", "pyarrow>=14", "pydicom>=2.4", "nibabel>=5", "scipy>=1.10", "scikit-image>=0.22"]
EVAL = DATA + ["pandas>=2", "matplotlib>=3.7"]
EXTRAS = {
    "data": DATA,                                   # python -m bagel_sr.data; the dry run; validation in training
    "eval": EVAL,                                   # python -m bagel_sr.eval.*
    "demo": EVAL + ["diffusers>=0.32,<0.36"],     # the embedded demo (AutoencoderDC since diffusers 0.32)
    "lora": ["peft>=0.17,<0.18"],  # --bagel_sr_lora_rank, bagel_sr.lora (tested: 0.17.1; diffusers 0.35 needs >= 0.17)
    "deepspeed": ["deepspeed>=0.14"],
    "wandb": ["wandb>=0.17"],
    "lpips": ["lpips>=0.1.4"],
    "gpu": ["flash-attn>=2.5"],
    # What a BAGEL checkout's training script and data code import (torchvision: match it to your torch).
    "checkout": ["accelerate>=0.34", "torchvision", "opencv-python-headless", "decord", "wandb>=0.17"],
    "dev": ["pytest>=8", "pytest-timeout", "import-linter>=2.1"],
}
EXTRAS["all"] = sorted({r for k, v in EXTRAS.items() if k not in ("gpu", "dev", "lpips") for r in v})

setup(
    name="bagel-sr",
    version="0.1.0",
    description="Pixel-fidelity loss plugin for BAGEL restoration fine-tuning (super-resolution, denoising, CT/MR)",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # One import name per folder: bagel_sr/ (the plugin's core and the subpackages below it), patches/ ->
    # bagel_sr.patches, eval/ -> bagel_sr.eval, train/ -> bagel_sr.train (README, "Architecture").
    packages=[
        "bagel_sr",
        "bagel_sr.patches",
        "bagel_sr.data",
        "bagel_sr.eval",
        "bagel_sr.lora",
        "bagel_sr.smoke",
        "bagel_sr.validation",
        "bagel_sr.gpu_check",
        "bagel_sr.embedded",
        "bagel_sr.train",
        "bagel_sr.testing",
    ],
    package_dir={
        "bagel_sr": "bagel_sr",
        "bagel_sr.patches": "patches",
        "bagel_sr.eval": "eval",
        "bagel_sr.train": "train",
    },
    package_data={"bagel_sr.embedded": ["assets/*.safetensors", "assets/*.json"], "bagel_sr.data": ["templates/*.yaml"]},
    # The plugin (core + patches + the wrapper): what with_pixel_loss and the patched loop need.
    install_requires=[
        "torch>=2.5",
        "transformers==4.49.*",
        "huggingface-hub>=0.24,<1.0",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pyyaml>=6",
    ],
    extras_require=EXTRAS,

)
