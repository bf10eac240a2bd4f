"""``python -m data_prep.tile``: whole slides -> a datalist of tiles over tissue; the same as ``stas tile``."""

import sys

from stas_pipeline import cli

if __name__ == "__main__":
    sys.exit(cli.main(["tile", *sys.argv[1:]]))
