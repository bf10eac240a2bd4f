"""``python -m data_prep.labelme_to_masks``: LabelMe JSON annotations -> binary PNG masks;
the same as ``stas labelme-to-masks``."""

import sys

from stas_pipeline import cli

if __name__ == "__main__":
    sys.exit(cli.main(["labelme-to-masks", *sys.argv[1:]]))
