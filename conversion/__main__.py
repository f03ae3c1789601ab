import sys

from internlm_jax.cli import main

sys.exit(main(["convert", *sys.argv[1:]]))
