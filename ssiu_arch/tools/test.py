"""``python -m ssiu_arch.tools.test -opt OPTIONS.yml``: ``basicsr test`` as a module."""
import sys

from ssiu_arch.tools.cli import basicsr_main

if __name__ == '__main__':
    sys.exit(basicsr_main(['test', *sys.argv[1:]]))
