"""``python -m data_prep.make_datalist``: images with masks or numeric labels -> k folds and a test split;
the same as ``stas make-datalist``."""

import sys

from stas_pipeline import cli

if __name__ == "__main__":
    sys.exit(cli.main(["make-datalist", *sys.argv[1:]]))
