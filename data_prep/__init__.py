"""The design card's data-preparation commands: thin entry points onto the ``stas`` stages of the same names.

``python -m data_prep.<command> ARGS`` is ``stas <stage> ARGS`` (same options, messages and exit codes)::

    python -m data_prep.labelme_to_masks ANNOTATIONS --out MASKS      LabelMe JSON -> 0/255 PNG masks
    python -m data_prep.make_datalist --images DIR --masks DIR --out datalist.json    k folds, test split
    python -m data_prep.build_lmdb --datalist datalist.json --bundle NAME --out CACHE  the bundle's chain, cached
    python -m data_prep.tile SLIDES --masks SOURCE --out DIR          whole slides -> a datalist of tiles
    python -m data_prep.rle {encode,decode} ...                       masks <-> Kaggle RLE CSV

The work is done in :mod:`stas_pipeline` (each stage's module under ``stas_pipeline/stages/``).
"""
