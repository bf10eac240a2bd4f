"""``python -m data_prep.build_lmdb``: a bundle's declared preprocessing chain run once into an LMDB cache;
the same as ``stas build-lmdb``."""

import sys

from stas_pipeline import cli

if __name__ == "__main__":
    sys.exit(cli.main(["build-lmdb", *sys.argv[1:]]))
