"""Install modkern. The `kernels/` folder is mapped into the package as `modkern.kernels`
(a popular PyPI package already owns the top-level name `kernels`)."""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
version: dict = {}
exec((ROOT / "modkern" / "_version.py").read_text(), version)

# torch is left as a lower bound: pin it yourself (the README does) so pip never swaps an
# installed CPU or CUDA build for a different one.
TEST = ["pytest>=8", "hypothesis>=6.100", "numpy>=1.26", "triton>=3.2",
        "matplotlib>=3.7"]  # the plots of the demo and the sweep are tested too
BENCH = ["pytest>=8", "pytest-benchmark>=4", "numpy>=1.26", "triton>=3.2"]

setup(
    name="modkern",
    version=version["__version__"],
    description="Mixture of Distributions (MoD) model merging with fused Triton kernels",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["modkern", "modkern.ops", "modkern.merging", "modkern.checkpoint", "modkern.decoding",
              "modkern.cli", "modkern.demo", "modkern.distill", "modkern.evaluation",
              "modkern.integrations",
              "modkern.kernels"],
    package_dir={"modkern": "modkern", "modkern.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "transformers>=4.56",  # from_pretrained(dtype=...)
        "tqdm>=4.60",
        "numpy>=1.26",
        "pyyaml>=6",
    ],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": TEST,
        "bench": BENCH,
        "demo": ["matplotlib>=3.7"],
        # MoD as a mergekit merge method (modkern.integrations.mergekit); 0.1.5 is the
        # release tested (its merge-method API changes between releases)
        "mergekit": ["mergekit==0.1.5"],
        "dev": sorted(set(TEST + BENCH + ["matplotlib>=3.7"])),
    },
    entry_points={"console_scripts": [
        "modkern=modkern.cli:main",
        "modkern-mergekit-yaml=modkern.integrations.mergekit:main",
    ]},
)
