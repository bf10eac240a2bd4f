"""``stas bundle``: a bundle of the package as one self-contained file MONAI's runner runs from any folder.

The bundles ship inside the package; their ``%bundles/...`` macros are relative to the repository root when
MONAI's runner reads them (``python -m monai.bundle run training --config_file bundles/deeplab_effb6.json`` in a
clone). Installed from a wheel, or from another folder, ``stas bundle NAME --out FILE`` writes the bundle with
every macro expanded (``core/bundles.py``, ``resolved_config``) and the bundles' ``logging.conf`` beside it:

    stas bundle deeplab_lite0 --out configs/deeplab_lite0.json
    python -m monai.bundle run training --config_file configs/deeplab_lite0.json --dataset_dir DATA ...

``stas bundle --list`` prints the bundle names with their task; ``stas bundle mlflow`` writes the MLflow tracking
settings (``--tracking``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stas_pipeline.cli import command
from stas_pipeline.core.bundles import BUNDLES_DIR, resolved_config, write_resolved
from stas_pipeline.core.fileio import OutputExistsError


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="bundle name (e.g. deeplab_lite0) or a bundle file")
    parser.add_argument("--out", type=Path, help="the file to write (default: ./<name>.json); logging.conf is "
                                                 "written beside it")
    parser.add_argument("--list", action="store_true", help="print the package's bundles and their tasks")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


@command
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the stage; 0 when written (or listed), 2 for an unknown bundle or an existing --out."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.list:
        for path in sorted(BUNDLES_DIR.glob("*.json")):
            config = json.loads(path.read_text())
            if "bundle_name" in config:
                print(f"{path.stem:<22} {resolved_config(path)['task']['name']}")
        return 0
    if args.name is None:
        parser.error("give a bundle name, or --list")
    config = resolved_config(args.name)  # an unknown bundle: one line, before anything is written
    out = args.out or Path(f"{config.get('bundle_name', Path(args.name).stem)}.json")
    if out.exists() and not args.overwrite:
        raise OutputExistsError(out)
    write_resolved(args.name, out)
    run = f": python -m monai.bundle run training --config_file {out} --dataset_dir DATA" \
        if "bundle_name" in config else " (tracking settings: --tracking " + str(out) + ")"
    print(f"wrote {out} (and {out.parent / 'logging.conf'}){run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
