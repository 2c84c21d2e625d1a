from setuptools import find_packages, setup

setup(
    name="pyro-avf",
    version="0.1.0",
    description="Amortized variational filtering for dynamical latent-variable models written in Pyro",
    long_description=open("README.rst").read(),
    long_description_content_type="text/x-rst",
    packages=find_packages(include=["pyro_avf", "pyro_avf.*", "data_loaders", "data_loaders.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.0,<3",
        "pyro-ppl>=1.9",
        "numpy>=1.23",
        "scipy>=1.9",
        "pandas>=1.5",
        "matplotlib>=3.6",
        "tqdm>=4.60",
        "pooch>=1.6",
    ],
    extras_require={
        "video": ["imageio>=2.30", "imageio-ffmpeg>=0.4"],
        "test": [
            "pytest>=7",
            "sphinx>=7",
            "ruff>=0.4",
            "nbclient>=0.7",
            "nbformat>=5.7",
            "ipykernel>=6",
            "imageio>=2.30",
            "imageio-ffmpeg>=0.4",
        ],
    },
    license="Apache-2.0",
)
