"""bagel-sr: pixel-fidelity losses for BAGEL's rectified-flow training (a plugin; BAGEL itself is imported
from the user's checkout at run time)."""
from setuptools import setup

setup(
    name="bagel-sr",
    version="0.1.0",
    description="Pixel-fidelity loss plugin for BAGEL restoration fine-tuning (super-resolution, denoising, CT/MR)",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "bagel_sr",
        "bagel_sr.data",
        "bagel_sr.embedded",
        "bagel_sr.patches",
        "bagel_sr.eval",
        "bagel_sr.lora",
    ],
    package_dir={
        "bagel_sr": "bagel_sr",
        "bagel_sr.patches": "patches",
        "bagel_sr.eval": "eval",
    },
    package_data={"bagel_sr.embedded": ["assets/*.safetensors", "assets/*.json"], "bagel_sr.data": ["templates/*.yaml"]},
    install_requires=[
        "torch>=2.5",
        "transformers==4.49.*",
        "huggingface-hub>=0.24,<1.0",
        "diffusers>=0.32,<0.36",  # AutoencoderDC (the embedded VAE) since 0.32
        "safetensors>=0.4",
        "accelerate>=0.34",
        "einops>=0.8",
        "numpy>=1.24",
        "scipy>=1.10",
        "scikit-image>=0.22",
        "pillow>=10",
        "pyyaml>=6",
        "tqdm>=4.66",
        "pyarrow>=14",
        "pydicom>=2.4",
        "nibabel>=5",
        "matplotlib>=3.7",
        "pandas>=2",
        "sentencepiece",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.5"],
        "deepspeed": ["deepspeed>=0.14"],  # tested: tests/test_deepspeed.py (ZeRO-2 on CPU, 2 ranks)
        "wandb": ["wandb>=0.17"],
        "lpips": ["lpips>=0.1.4"],
        "lora": ["peft==0.15.*"],  # tested: peft 0.15.2 with transformers 4.49 (tests/test_lora_*.py)
        "dev": ["pytest>=8", "pytest-timeout"],
        # What a BAGEL checkout's training script and data code import (torchvision: match it to your torch).
        "checkout": ["torchvision", "opencv-python-headless", "decord", "wandb>=0.17"],
    },
)
