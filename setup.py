"""imta_fast packaging.

The repository keeps its Triton kernels in the top-level ``kernels/`` folder, but PyPI already has
an unrelated, popular ``kernels`` package, so that folder is installed under the import name
``imta_fast.kernels`` (``package_dir`` mapping below) and never as a bare top-level module.
"""
from setuptools import find_packages, setup

packages = [p for p in find_packages(include=["imta_fast", "imta_fast.*"])] + ["imta_fast.kernels"]

setup(
    name="imta_fast",
    version="0.1.0",
    description="Fast, faithful training and serving of adaptive multi-exit image classifiers (MSDNet, IMTA)",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"imta_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "torchvision", "numpy", "tqdm", "pyyaml", "matplotlib", "scikit-learn", "mlxtend", "safetensors"],
    extras_require={"dali": ["nvidia-dali-cuda130"], "dev": ["pytest", "pytest-benchmark"]},
)
