"""``python -m ssiu_arch.tools.train -opt OPTIONS.yml [...]``: ``basicsr train`` as a module, for torchrun/srun.

    torchrun --nproc_per_node=4 --master_port=4321 -m ssiu_arch.tools.train \\
        -opt options/train_SSIU_x2.yml --launcher pytorch
"""
import sys

from ssiu_arch.tools.cli import basicsr_main

if __name__ == '__main__':
    sys.exit(basicsr_main(['train', *sys.argv[1:]]))
