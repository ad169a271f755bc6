from setuptools import setup

# `kernels/` ships as `mmscale.kernels`: a top-level `kernels` module would shadow the Hugging Face
# `kernels` package that transformers and bitsandbytes import under that name.
setup(
    name="mmscale",
    version="0.1.0",
    description="Distributed trainer for multimodal (image + text) models on DeepSpeed",
    python_requires=">=3.10",
    packages=[
        "mmscale",
        "mmscale.data",
        "mmscale.model",
        "mmscale.training",
        "mmscale.callbacks",
        "mmscale.evaluation",
        "mmscale.continual",
        "mmscale.kernels",
    ],
    package_dir={"mmscale": "mmscale", "mmscale.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "transformers>=4.45",
        "peft>=0.12",
        "webdataset>=0.2.90",
        "bitsandbytes>=0.44",
        "triton>=3.0",
        "sentencepiece>=0.2",
        "pyyaml>=6",
        "pillow>=10",
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "matplotlib>=3.8",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "scikit-learn>=1.4"],
        "flash": ["flash-attn>=2.6"],
    },
    entry_points={
        "console_scripts": [
            "mmscale-write-shards=mmscale.data.write_shards:main",
            "mmscale-train-tokenizer=mmscale.data.tokenizer:main",
            "mmscale-make-demo-data=mmscale.data.synthetic:main",
        ]
    },
)
