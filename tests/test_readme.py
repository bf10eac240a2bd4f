"""The README's commands stay true: every ``stas`` (or
``python -m stas_pipeline.stages.<stage>``) command parses with the stage's own parser, and
every ``monai.bundle`` command names existing config files, entry points and top-level keys.

(The set-up and test commands are what ``.ci/run`` runs; the demo command is run by tests/test_demo.py.)
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest

from stas_pipeline.cli import STAGES

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    """Each shell command of the README's ``bash`` blocks, continuation lines joined, split on ``&&``/``|``."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words: list[str] = []
            for word in shlex.split(line, comments=True) + ["&&"]:
                if word in ("&&", "||", "|", ";"):
                    commands += [words] if words else []
                    words = []
                else:
                    words.append(word)
    return commands


def after(words: list[str], marker: list[str]) -> list[str] | None:
    """The words after the first occurrence of ``marker`` (a run of words), or None."""
    for i in range(len(words) - len(marker) + 1):
        if words[i:i + len(marker)] == marker:
            return words[i + len(marker):]
    return None


def stage_commands() -> list[tuple[str, list[str]]]:
    found = []
    for words in readme_commands():
        for i, word in enumerate(words):
            if word == "stas" and i + 1 < len(words) and not words[i + 1].startswith("-"):
                found.append((words[i + 1], words[i + 2:]))
                break
            if word.startswith("stas_pipeline.stages.") and i > 0 and words[i - 1] == "-m":
                stage = word.rsplit(".", 1)[1].replace("_", "-")
                found.append((stage, words[i + 1:]))
                break
    return found


def bundle_commands() -> list[list[str]]:
    return [rest for words in readme_commands() if (rest := after(words, ["monai.bundle", "run"])) is not None]


def test_readme_has_commands_of_every_kind():
    stages = {name for name, _ in stage_commands()}
    assert {"labelme-to-masks", "make-datalist", "build-lmdb", "predict", "ensemble", "evaluate", "export"} <= stages
    assert len(bundle_commands()) >= 3


@pytest.mark.parametrize(("stage", "argv"), stage_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_stage_command_parses(stage, argv):
    assert stage in STAGES, f"README uses unknown stage {stage!r}"
    if argv in ([], ["--help"]):
        return
    parser = importlib.import_module(STAGES[stage][0]).build_parser(f"stas {stage}")
    parser.parse_args(argv)  # SystemExit (a failed test) on an unknown or malformed option


@pytest.mark.parametrize("argv", bundle_commands(), ids=lambda v: v[0])
def test_bundle_command_names_real_files_entries_and_keys(argv):
    if argv[0] == "--config_file":  # MONAI's default entry point: a bundle stas export-model writes, not ours
        assert "configs/inference.json" in argv[1]
        return
    run_id, rest = argv[0], argv[1:]
    files = rest[rest.index("--config_file") + 1]
    files = json.loads(files.replace("'", '"')) if files.startswith("[") else [files]
    config: dict = {}
    for name in files:
        config.update(json.loads((REPO / name).read_text()))
    assert run_id in config, f"{files} has no entry point {run_id!r}"
    keys = [a[2:] for a in rest if a.startswith("--") and a != "--config_file"]
    unknown = [k for k in keys if k not in config]
    assert not unknown, f"README overrides keys that {files} lacks: {unknown}"
