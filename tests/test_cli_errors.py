"""The one error path of every stage (stas_pipeline.cli.command): a refusal is one ERROR line with its exit code,
an internal fault exit 3 with its traceback in a log file (or on stderr with --debug / STAS_DEBUG=1)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from stas_pipeline.cli import STAGES, command
from stas_pipeline.core.errors import EXIT_INTERNAL, NothingWrittenError, StasError, refused

REPO = Path(__file__).resolve().parents[1]


@command
def refusing(argv: list[str], prog: str | None) -> int:
    raise StasError(f"{argv[0]}: no such file")


@command
def nothing_written(argv: list[str], prog: str | None) -> int:
    raise NothingWrittenError("out: every input was skipped")


@command
def faulty(argv: list[str], prog: str | None) -> int:
    return {}["missing"]  # a bug: KeyError


@command
def reading(argv: list[str], prog: str | None) -> int:
    with refused():
        Path(argv[0]).read_text()
    return 0


def test_a_refusal_is_one_line_with_its_exit_code(capsys):
    assert refusing(["a.json"], "stas x") == 2
    assert capsys.readouterr().err == "ERROR a.json: no such file\n"
    assert nothing_written([], "stas x") == 2  # nothing could be done
    assert capsys.readouterr().err == "ERROR out: every input was skipped\n"


def test_an_unreadable_file_inside_refused_is_a_refusal_not_a_fault(tmp_path, capsys):
    assert reading([str(tmp_path / "nope.txt")], "stas x") == 2
    err = capsys.readouterr().err
    assert err.startswith("ERROR ") and "nope.txt" in err and len(err.splitlines()) == 1


def test_an_internal_fault_names_its_log_and_debug_prints_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv("STAS_DEBUG", raising=False)
    assert faulty([], "stas x") == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "INTERNAL ERROR in stas x: KeyError" in err and "Traceback" not in err
    log = Path(re.search(r"traceback in (\S+\.log)", err).group(1))
    assert "Traceback" in log.read_text() and "KeyError: 'missing'" in log.read_text()
    log.unlink()
    assert faulty(["--debug"], "stas x") == EXIT_INTERNAL
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("STAS_DEBUG", "1")
    assert faulty([], "stas x") == EXIT_INTERNAL
    assert "Traceback" in capsys.readouterr().err


def test_the_stas_command_ends_a_refusal_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "stas_pipeline.cli", "ensemble", str(tmp_path / "nope"),
                          str(tmp_path / "nope2"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and out.stderr.startswith("ERROR ") and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


HEAVY = ("torch", "monai")  # importing MONAI alone takes 10-13 s on a 2-core VM


def test_every_stage_reads_its_arguments_before_importing_torch_or_monai():
    """``stas <stage> --help`` and a usage error come at once: each stage builds its parser from plain data
    (core/options.py, the tasks' task.py) and imports torch and MONAI only once its arguments are read."""
    code = ("import contextlib, io, json, sys\n"
            "from stas_pipeline.cli import STAGES, main\n"
            "seen = {}\n"
            "for stage in STAGES:\n"
            "    for argv in ([stage, '--help'], [stage, '--no-such-option']):\n"
            "        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "            try:\n"
            "                main(argv)\n"
            "            except SystemExit:\n"
            "                pass\n"
            f"        seen[' '.join(argv)] = [m for m in {HEAVY!r} if m in sys.modules]\n"
            "print(json.dumps(seen))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    seen = json.loads(out.stdout)
    assert len(seen) == 2 * len(STAGES)
    first = next((f"stas {argv}: {modules}" for argv, modules in seen.items() if modules), None)
    assert first is None, f"imported before the arguments were read: {first}"
