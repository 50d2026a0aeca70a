"""Installing keeps the user's torch; without basicsr the networks, infer, export, convert and spandrel work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def test_requirements_are_ranges_that_the_installed_versions_satisfy():
    requirements = [Requirement(r) for r in metadata.requires('ssiu')]
    assert requirements and not [str(r) for r in requirements if any(s.operator == '==' for s in r.specifier)]
    core = {r.name.lower() for r in requirements if r.marker is None}
    assert 'basicsr' not in core and 'torchvision' not in core  # extras: [basicsr], [spandrel], [onnx]
    for r in requirements:
        assert metadata.version(r.name) in r.specifier, r


def test_installing_into_a_venv_with_torch_installs_no_other_torch(tmp_path):
    report = tmp_path / 'report.json'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--dry-run', '--quiet', '--no-build-isolation',
                    '--report', str(report), f'{ROOT}[basicsr,spandrel,onnx]'],
                   check=True, cwd=tmp_path, capture_output=True, timeout=300)
    names = [item['metadata']['name'].lower() for item in json.loads(report.read_text())['install']]
    assert names == ['ssiu'], names  # torch, torchvision and everything else: already satisfied


# Run in a fresh interpreter where `import basicsr` fails, as in an environment without it.
WITHOUT_BASICSR = textwrap.dedent('''
    import sys
    from pathlib import Path

    import cv2
    import numpy as np
    import torch

    from ssiu_arch import SSIU, IDSANet
    from ssiu_arch.tools.cli import ssiu_main
    from ssiu_arch.utils.weights import network_options, save_weights

    tmp = Path(sys.argv[1])
    net = SSIU(upscale=2, num_feat=16, num_block=3).eval()
    assert IDSANet(upscale=2, num_feat=16, num_block=2)(torch.rand(1, 3, 9, 7)).shape == (1, 3, 18, 14)
    torch.save({'epoch': 1, 'model_state_dict': {'module.' + k: v for k, v in net.state_dict().items()}},
               tmp / 'published.pt')
    assert ssiu_main(['convert', str(tmp / 'published.pt'), str(tmp / 'net.pth')]) == 0
    assert ssiu_main(['convert', str(tmp / 'net.pth'), str(tmp / 'net.safetensors')]) == 0
    cv2.imwrite(str(tmp / 'in.png'), np.full((10, 12, 3), 128, np.uint8))
    assert ssiu_main(['infer', str(tmp / 'in.png'), '-w', str(tmp / 'net.safetensors'), '-o', str(tmp / 'sr')]) == 0
    assert cv2.imread(str(next((tmp / 'sr').iterdir()))).shape == (20, 24, 3)
    assert ssiu_main(['export', str(tmp / 'net.pth'), '--onnx', str(tmp / 'net.onnx')]) == 0

    import ssiu_arch.spandrel  # first: it makes a CUDA torchvision beside a CPU torch importable
    import spandrel
    ssiu_arch.spandrel.register()
    model = spandrel.ModelLoader().load_from_file(tmp / 'net.safetensors')
    with torch.no_grad():
        x = torch.rand(1, 3, 11, 13)
        assert (model(x) - net(x).clamp(0, 1)).abs().max() <= 1e-5

    import ssiu_arch.datasets_lmdb.cli  # noqa: F401  (ssiu lmdb)
    import ssiu_arch.tools.bench  # noqa: F401  (ssiu bench)
    assert not [m for m in sys.modules if m.split('.')[0] == 'basicsr'], 'basicsr was imported'
    try:
        ssiu_main(['results', '--scale', '2'])
    except SystemExit as err:
        print('results:', err)
    print('ok without basicsr')
''')


def test_networks_and_tools_work_without_basicsr(tmp_path):
    blocker = tmp_path / 'blocker' / 'basicsr'
    blocker.mkdir(parents=True)
    (blocker / '__init__.py').write_text("raise ModuleNotFoundError(\"No module named 'basicsr'\", name='basicsr')\n")
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(blocker.parent), str(ROOT)])}
    proc = subprocess.run([sys.executable, '-c', WITHOUT_BASICSR, str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'ok without basicsr' in proc.stdout
    assert "results: ssiu results: needs basicsr, which is not installed or does not import (pip install " \
           "'ssiu[basicsr]')" in proc.stdout
