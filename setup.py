from setuptools import find_packages, setup

EXTRAS = {
    "flux": [
        "diffusers==0.42.1",
        "transformers>=5,<6",
        "accelerate>=1.15,<1.16",
        "peft>=0.21,<0.22",
        "sentencepiece",
        "omegaconf",
        "pyyaml",
    ],
    "triton": ["triton>=3.9,<3.10"],
    "deepspeed": ["deepspeed==0.19.8", "accelerate>=1.15,<1.16", "omegaconf", "packaging"],
    "plot": ["matplotlib"],
    "test": ["pytest>=8", "pytest-benchmark>=5", "pytest-timeout"],
}
# everything the test suite exercises; install with DS_BUILD_OPS=0 so DeepSpeed compiles no CUDA ops
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setup(
    name="flux-npu",
    version="0.1.0",
    description="Hardware-abstraction backends and drop-in patches that run unchanged Flux code on Ascend NPU, CUDA and CPU",
    packages=find_packages(include=["flux_npu", "flux_npu.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is installed first by the README commands (the CPU wheel on disk here); a range
        # that 2.13 satisfies keeps pip from pulling a CUDA build on top of it.
        "torch>=2.4",
        "numpy",
        "safetensors",
        "tqdm",
        "psutil",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["flux-npu=flux_npu.cli:main"]},
)
