"""fmecompile: a PyTorch FX compiler for fast, memory-efficient video diffusion inference.

The repository keeps the rewrite passes and the Triton kernels at the top level
(`passes/`, `kernels/`); they install as `fmecompile.passes` (with its subpackages) and
`fmecompile.kernels`.
"""
from setuptools import setup

setup(
    name="fmecompile",
    version="0.1.0",
    description="FX graph-rewriting compiler for memory-efficient video diffusion inference",
    python_requires=">=3.10",
    packages=["fmecompile", "fmecompile.tools", "fmecompile.runtime", "fmecompile.kernels", "fmecompile.passes",
              "fmecompile.passes.slice", "fmecompile.passes.group", "fmecompile.passes.rehash"],
    package_dir={
        "fmecompile": "fmecompile",
        "fmecompile.passes": "passes",
        "fmecompile.kernels": "kernels",
    },
    # py.typed: the package ships its type hints (PEP 561).
    package_data={"fmecompile": ["configs/*.json", "configs/README.md", "py.typed"]},
    install_requires=["torch>=2.11", "diffusers>=0.30", "triton", "nvidia-ml-py"],
    # transformers: the pipelines' CLIP encoders (fmecompile.pipelines, fme bench --pipeline).
    # plots: `fme ablate` draws its plot with matplotlib when present (else a stdlib PNG writer).
    # test: peft and accelerate so that the LoRA loaders and accelerate's offload hooks are
    # tested with an optimized pipeline (those tests skip without them).
    extras_require={"pipelines": ["transformers>=4.40"], "plots": ["matplotlib>=3.5"],
                    "test": ["pytest", "pytest-xdist", "hypothesis", "transformers>=4.40", "matplotlib>=3.5",
                             "peft", "accelerate"]},
    entry_points={
        "console_scripts": ["fme = fmecompile.cli:main"],
        # torch.compile(model, backend="fme") finds the backend here, in any interpreter,
        # without fmecompile being imported first.
        "torch_dynamo_backends": ["fme = fmecompile.backend:fme_backend"],
    },
)
