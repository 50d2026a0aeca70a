"""Run by torchrun in test_training.py: ``basicsr train`` in one rank, then save that rank's weights.

BasicSR saves only rank 0's network; to show that data-parallel training keeps every rank in step,
this worker keeps a handle on the model it builds and writes ``rank<N>.pth`` after training.
"""
import os
import sys

import torch

import ssiu_arch.models  # noqa: F401  (compatibility fixes before basicsr.train)
from ssiu_arch.tools.cli import basicsr_main


def main() -> None:
    import basicsr.train  # after ssiu_arch.models, whose import applies the compatibility fixes

    built = []
    build_model = basicsr.train.build_model

    def capture(opt):
        built.append(build_model(opt))
        return built[-1]

    out_dir = os.environ['SSIU_TEST_RANK_WEIGHTS']
    basicsr.train.build_model = capture
    basicsr_main(['train', *sys.argv[1:]])
    net = built[0].get_bare_model(built[0].net_g)
    torch.save(net.state_dict(), os.path.join(out_dir, f'rank{os.environ["RANK"]}.pth'))


if __name__ == '__main__':
    main()
