"""``python -m data_prep.rle``: mask images <-> Kaggle RLE CSV (id,encoding); the same as ``stas rle``."""

import sys

from stas_pipeline import cli

if __name__ == "__main__":
    sys.exit(cli.main(["rle", *sys.argv[1:]]))
