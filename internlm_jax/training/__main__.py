import sys

from internlm_jax.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
