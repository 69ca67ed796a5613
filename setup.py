"""Cantus: train text-to-audio latent diffusion models at cluster scale on DeepSpeed."""
from setuptools import find_packages, setup

setup(
    name="cantus",
    version="0.1.0",
    description="Raw audio to a trained Stable-Audio-class latent diffusion model, on DeepSpeed and SLURM",
    packages=find_packages(include=["pipeline", "pipeline.*"]),
    python_requires=">=3.10",
    # Ranges that torch 2.13.0 (installed first, from the local CPU wheel) satisfies.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "webdataset>=0.2.86",
        "einops>=0.7",
        "transformers>=4.40",
        "boto3>=1.34",
        "soundfile>=0.12",
        "soxr>=0.3",
        "safetensors>=0.4",
        "wandb>=0.16",
        "matplotlib>=3.7",  # spectrograms with axes on the report pages
        "tqdm>=4.66",
        "numpy>=1.24",
        "ninja>=1.11",  # DeepSpeed JIT-builds its C++ ops with it
    ],
    extras_require={
        "flash": ["flash-attn>=2.5"],
        "xtransformers": ["x-transformers>=1.27"],
        "test": ["pytest>=8", "pytest-timeout>=2.2", "scipy>=1.11", "x-transformers>=1.27", "pillow>=10"],
        "demo": ["music21>=9.1", "pyfluidsynth>=1.3", "scipy>=1.11"],
    },
)
