"""S3Rec training suite: pip install -e .[dev] (docs/install.md)"""
from setuptools import find_packages, setup

SUBPACKAGES = ("launch", "analysis", "data_prep")

setup(
    name="s3rec",
    version="0.1.0",
    description="S3Rec (CIKM 2020) and low-rank variants: HDF5 data, DeepSpeed training, "
                "SLURM/submitit grids, TensorBoard analysis",
    python_requires=">=3.10",
    # launch/, analysis/ and data_prep/ are folders of the checkout's top level (one per job of the
    # suite) but install as s3rec.launch, s3rec.analysis and s3rec.data_prep: top-level names
    # that would collide with other packages in a shared environment.
    packages=find_packages(include=["s3rec", "s3rec.*"]) + [f"s3rec.{p}" for p in SUBPACKAGES],
    package_dir={f"s3rec.{p}": p for p in SUBPACKAGES},
    package_data={"": ["*.json", "*.yaml"]},
    # The ranges tested (docs/install.md's table names the oldest and newest run of each; its
    # test, tests/test_install.py, checks these admit both). torch and DeepSpeed stop at the next
    # minor release, whose distributed and ZeRO behaviour the suite relies on; the others, with
    # stable APIs for what the suite uses, have no upper bound, so pip keeps a user's newer ones.
    # No pins: pip keeps a torch already installed (a user's CUDA build); the CPU wheel for
    # machines without one is in tools/constraints-ci.txt.
    install_requires=[
        "torch>=2.13.0,<2.15",
        "deepspeed>=0.19.8,<0.20",
        "h5py>=3.14.0",
        "numpy>=2.0.2",
        "mpi4py>=4.1.2",
        "submitit>=1.5.4",
        "tensorboard>=2.18.0",
        "pyyaml>=6.0.1",
        "matplotlib>=3.10.9",
        "psutil>=5.9.8",
        "packaging>=24.2",
    ],
    # scipy: the tests check the report's statistics against it
    extras_require={"dev": ["pytest>=8", "mpich", "scipy"]},
    entry_points={"console_scripts": [
        "s3rec-prep=s3rec.data_prep.cli:main",
        "s3rec-pretrain=s3rec.pretrain:main",
        "s3rec-finetune=s3rec.finetune:main",
        "s3rec-evaluate=s3rec.evaluate:main",
        "s3rec-import-original=s3rec.import_original:main",
        "s3rec-grid=s3rec.launch.grid_cli:main",
        "s3rec-report=s3rec.analysis.report:main",
    ]},
)
