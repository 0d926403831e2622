"""megatron-offload-plugin: pipeline offload and zero-bubble schedules for Megatron-core and DeepSpeed."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="megatron-offload-plugin",
    version="0.1.0",
    description=(
        "Drop-in activation offload, zero-bubble pipeline schedules and layer-wise "
        "optimizer offload for Megatron-core and DeepSpeed"
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_offload_plugin", "megatron_offload_plugin.*"]),
    package_data={"megatron_offload_plugin": ["data/*.txt", "py.typed"]},
    # torch is deliberately unpinned: on a GPU cluster the user's own CUDA build is kept.
    install_requires=[
        "torch>=2.1",
        "megatron-core>=0.16,<0.20",
        "pydantic>=2.5",
        "pyyaml>=6",
        "packaging>=23",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.19,<0.20"],
        "plot": ["matplotlib>=3.7"],
        "test": ["pytest>=8", "matplotlib>=3.7", "deepspeed>=0.19,<0.20"],
    },
    entry_points={
        "console_scripts": [
            "megatron-offload-plugin=megatron_offload_plugin.__main__:main",
        ]
    },
)
