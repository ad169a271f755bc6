from setuptools import setup

# The Triton kernels live in the repository's top-level kernels/ folder and ship as `mmscale.kernels`, from
# kernels/xattn/. kernels/ itself holds no __init__.py, so no working directory makes it a top-level package named
# `kernels` (Hugging Face's `kernels`, which transformers requires, has that name): at most it is a PEP 420 namespace
# portion, which Python ranks below any regular package of the same name (kernels/README.md).
#
# Ranges here are what mmscale works with, capped at the next major version of each library that breaks across
# majors; constraints.txt pins the exact versions CI last passed on (pip install -c constraints.txt ...), and
# tools/check_newest.sh tries the newest releases in a scratch venv.
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
        "mmscale.objectives",
        "mmscale.job",
        "mmscale.export",
        "mmscale.media",
        "mmscale.kernels",
    ],
    package_dir={"mmscale": "mmscale", "mmscale.kernels": "kernels/xattn"},
    install_requires=[
        "torch>=2.4,<3",
        "deepspeed>=0.15,<1",
        "transformers>=4.45,<6",
        "peft>=0.12,<1",
        "webdataset>=0.2.90,<2",
        "bitsandbytes>=0.44,<1",
        "triton>=3.0,<4",
        "sentencepiece>=0.2,<1",
        "pyyaml>=6,<7",
        "pillow>=10,<14",
        "tqdm>=4.66,<5",
        "tensorboard>=2.15,<3",
        "matplotlib>=3.8,<4",
        "numpy<3",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "pytest-timeout>=2.3,<3", "scikit-learn>=1.4,<2", "av>=12,<19", "soundfile>=0.12,<1"],
        "video": ["av>=12,<19"],  # video files (mp4, webm...) as media; frame members need nothing
        "audio": ["soundfile>=0.12,<1"],  # flac and non-PCM wav; 16-bit PCM wav reads without it
        "flash": ["flash-attn>=2.6,<3"],
    },
    entry_points={
        "console_scripts": [
            # Each is also `python -m MODULE` (the README says which).
            "mmscale-write-shards=mmscale.data.write_shards:main",
            "mmscale-train-tokenizer=mmscale.data.tokenizer:main",
            "mmscale-make-demo-data=mmscale.data.synthetic:main",
            "mmscale-make-media-data=mmscale.data.media_demo:main",
            "mmscale-interleaved=mmscale.data.interleaved:main",
            "mmscale-digits=mmscale.data.digits:main",
            "mmscale-demo-objects=mmscale.evaluation.demo_objects:main",
            "mmscale-image-use=mmscale.evaluation.image_use:main",
            "mmscale-finetune-report=mmscale.evaluation.finetune_report:main",
            "mmscale-export=mmscale.export:main",
            "mmscale-cluster=mmscale.training.cluster:main",
        ]
    },
)
