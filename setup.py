"""vdm: a JAX/Flax research codebase for diffusion models."""
from setuptools import find_packages, setup

setup(
    name="vdm",
    version="0.1.0",
    description="Diffusion models in JAX/Flax: DDPM, improved DDPM, DDIM, NCSN, VDM.",
    packages=find_packages(include=["vdm", "vdm.*"]),
    python_requires=">=3.10",
    install_requires=[
        # The JAX stack is pinned as one tested set: these libraries change
        # their APIs between minor versions.
        "jax[cpu]==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "ml-collections==1.1.0",
        "tensorflow-datasets==4.9.10",
        "tensorflow-cpu==2.21.0",  # tfds builders/mock_data and TensorBoard summaries
        "tensorboard==2.21.0",
        "clu==0.0.12",
        "absl-py>=2.1",
        "numpy>=1.26",
        "scipy>=1.11",
        "scikit-learn>=1.4",  # ships the embedded 8x8 digits data set
        "matplotlib>=3.8",
        "pillow>=10",
        "imageio>=2.34",
        "tqdm>=4.66",
    ],
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3.5"]},
)
