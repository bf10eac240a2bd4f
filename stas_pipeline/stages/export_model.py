"""``stas export-model``: trained runs of one task (models x folds) -> a MONAI model-zoo bundle folder.

``stas export-model runs/deeplab_lite0/fold*/best.pt runs/unet_lite0/fold*/best.pt --out stas_bundle`` writes
``stas_bundle/`` (only when complete): ``configs/inference.json`` (the runs averaged as ``stas predict`` averages
them, flip TTA ``hv`` by default), ``configs/metadata.json``, each run under ``models/<bundle>_fold<k>/`` as its
state dict (``model.pt``), TorchScript (``model.ts``) and ONNX (``model.onnx``, dynamic batch) files with its
record and its bundle's resolved configuration, ``docs/README.md`` and ``LICENSE``. Each export is checked against
the network (within 1e-4, plus 1e-4 x |output|) before it is kept. Run the bundle, from any working directory::

    python -m monai.bundle run --config_file stas_bundle/configs/inference.json --input_dir IMAGES --output_dir OUT

(``--backend torchscript`` or ``onnxruntime`` runs the exported files; ``--tta none`` switches TTA off.) See
stas_pipeline/tasks/model_zoo.py for the layout. Needs ``pip install stas_pipeline[export]`` (onnx,
onnxscript, onnxruntime).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stas_pipeline.cli import command
from stas_pipeline.core.options import ONNX_OPSET


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="+", type=Path, metavar="PT",
                        help="best.pt of one or more training runs of one task (models x folds), averaged")
    parser.add_argument("--out", type=Path, required=True, help="the bundle folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    parser.add_argument("--opset", type=int, default=ONNX_OPSET, help=f"ONNX opset ({ONNX_OPSET} or newer)")
    parser.add_argument("--version", default="0.1.0", help="the bundle's version in its metadata (0.1.0)")
    return parser


@command
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the stage; 0 when the bundle was written, 2 when it was refused (nothing written)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.opset < ONNX_OPSET:
        parser.error(f"--opset {args.opset}: the exporter writes opset {ONNX_OPSET} or newer")
    from stas_pipeline.core.trained_runs import run_info_of  # torch and MONAI: after the arguments
    from stas_pipeline.tasks.model_zoo import command as bundle_command
    from stas_pipeline.tasks.model_zoo import export_bundle, task_of

    infos = [run_info_of(checkpoint) for checkpoint in args.checkpoint]
    task = task_of(infos)
    members = export_bundle(args.checkpoint, infos, args.out, args.overwrite, args.opset, args.version)
    print(f"wrote {args.out}: {task.name}, {len(members)} members ({', '.join(members)})\n"
          f"run it: {bundle_command(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
