"""Distribution `ssiu`: the SSIU super-resolution network as a BasicSR plugin.

The user-facing top level keeps `ssiu_arch/`, `losses/` and `datasets_lmdb/` side by side; they are
installed under the single import package `ssiu_arch` so that no generic name such as `losses`
lands in site-packages.
"""
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
# Optional dependencies (extras_require below).
BASICSR = ['basicsr>=1.4.2', 'torchvision>=0.16']  # torchvision: also imported by HROnlyBicubicDataset
SPANDREL = ['spandrel>=0.4']
ONNX = ['onnx>=1.15', 'onnxruntime>=1.17']


setup(
    name='ssiu',
    version='0.1.0',
    description='SSIU (Structural Similarity-Inspired Unfolding, IEEE TIP 2025) for BasicSR',
    long_description=(HERE / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=['ssiu_arch', 'ssiu_arch.archs', 'ssiu_arch.cpu', 'ssiu_arch.evaluation', 'ssiu_arch.models',
              'ssiu_arch.tools', 'ssiu_arch.utils', 'ssiu_arch.losses', 'ssiu_arch.datasets_lmdb'],
    package_dir={
        'ssiu_arch': 'ssiu_arch',
        'ssiu_arch.losses': 'losses',
        'ssiu_arch.datasets_lmdb': 'datasets_lmdb',
    },
    # The CPU kernels' source ships with the package: they are compiled on first use against the torch that
    # imports them (ssiu_arch/cpu/build.py), so every install route gets them, build isolation or not.
    package_data={'ssiu_arch': ['data/*.csv'], 'ssiu_arch.cpu': ['csrc/*.cpp']},
    # Ranges, not pins: installing into an environment that has torch (a CUDA workstation, a ComfyUI venv) keeps
    # it. The tested versions are pinned in scripts/constraints.txt, which scripts/setup.sh applies.
    install_requires=[
        'torch>=2.6',
        'einops>=0.7',  # the networks' tensor layouts (ESAM windows)
        # The CPU kernels' first-use build: its lock, and the build tool torch.utils.cpp_extension.load runs.
        'filelock>=3.0',
        'ninja>=1.11',
        'lmdb>=1.4',
        'matplotlib>=3.7',
        'numpy>=1.24',
        'opencv-python>=4.8',
        # The EXIF orientation tag of photos (ssiu_arch/utils/images.py); OpenCV skips it when keeping alpha/depth.
        'pillow>=9.1',
        'pyyaml>=6.0',
        'safetensors>=0.4',
        'tqdm>=4.60',
    ],
    extras_require={
        # BasicSR training/testing: `basicsr train|test`, SSIUModel, the losses, HROnlyBicubicDataset,
        # `ssiu results`. basicsr 1.4.2 is an sdist whose build needs torch: install it with
        # --no-build-isolation once torch is installed.
        'basicsr': BASICSR,
        'spandrel': SPANDREL,
        'onnx': ONNX,
        'dev': [*BASICSR, *SPANDREL, *ONNX, 'pytest>=8', 'pytest-timeout>=2', 'ruff>=0.5'],
    },
    entry_points={
        'console_scripts': [
            'basicsr = ssiu_arch.tools.cli:basicsr_main',
            'ssiu = ssiu_arch.tools.cli:ssiu_main',
        ],
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Image Processing',
    ],
)
