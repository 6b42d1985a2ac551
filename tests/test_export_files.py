"""`bpcompile export -o DIR` writes all of its files or none: a temporary folder next to DIR moved
in, a non-empty DIR refused unless --force (which replaces only the export's own files), and a
failure mid-export (a full disk) leaves DIR as it was with no temporary folder behind."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

import bpcompile as bp
from bpcompile.tools import export
from bpcompile.tools.cli import main

FILES = {"model.h", "model.c", "main.c", "Makefile", "params.bin"}
USER_FILES = {"main.c": b"int main(void) { return 42; } /* mine */\n", "Makefile": b"all:\n\techo mine\n",
              "notes.txt": b"my notes\n"}


def tiny() -> bp.Graph:
    g = bp.Graph("tiny")
    x = g.input("x", ("batch", 3))
    t = g.input("t", ("batch", 2))
    w = g.param("W", (3, 2), init="glorot_uniform")
    out = bp.tanh(x @ w)
    g.output("out", out)
    g.loss(bp.mse(out, t))
    return g


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith((".tmp", export.TEMP_SUFFIX))]


def user_folder(path: Path, files: dict[str, bytes] = USER_FILES) -> Path:
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


def test_a_new_folder_and_its_missing_parents_are_created(tmp_path):
    out = tmp_path / "a" / "b" / "lib"
    result = export.export_model(tiny(), out, "float64")
    assert {p.name for p in out.iterdir()} == FILES == set(result.files)
    assert result.path == out and (out / "Makefile").read_text().startswith("# ")
    assert export.read_param_file(out / "params.bin")["W"].shape == (3, 2)
    assert out.stat().st_mode & 0o700 == 0o700 and not temporaries(tmp_path)


def test_an_empty_folder_is_replaced_and_keeps_its_permissions(tmp_path):
    out = tmp_path / "lib"
    out.mkdir()
    out.chmod(0o750)
    export.export_model(tiny(), out, "float64")
    assert {p.name for p in out.iterdir()} == FILES
    assert out.stat().st_mode & 0o777 == 0o750 and not temporaries(tmp_path)


def test_the_current_folder_is_filled_not_replaced(tmp_path, monkeypatch):
    out = tmp_path / "here"
    out.mkdir()
    monkeypatch.chdir(out)
    result = export.export_model(tiny(), ".", "float64")
    assert result.path == Path(".") and Path.cwd().samefile(out)  # the shell's folder was not swapped away
    assert {p.name for p in out.iterdir()} == FILES and not temporaries(tmp_path)


@pytest.mark.parametrize("files", [USER_FILES, {"notes.txt": b"my notes\n"}], ids=["clashing", "other"])
def test_a_non_empty_folder_is_refused_and_left_untouched(tmp_path, files):
    out = user_folder(tmp_path / "lib", files)
    before = snapshot(tmp_path)
    with pytest.raises(export.ExportError) as info:
        export.export_model(tiny(), out, "float64")
    message = str(info.value)
    assert str(out) in message and "--force" in message and "not empty" in message
    if "main.c" in files:
        assert "would overwrite main.c, Makefile" in message
    else:
        assert "notes.txt" in message
    assert snapshot(tmp_path) == before


def test_force_replaces_only_the_files_the_export_writes(tmp_path):
    out = user_folder(tmp_path / "lib")
    (out / "params.bin").symlink_to(tmp_path / "elsewhere.bin")  # replaced as a name, not followed
    export.export_model(tiny(), out, "float64", force=True)
    assert {p.name for p in out.iterdir()} == FILES | {"notes.txt"}
    assert (out / "notes.txt").read_bytes() == USER_FILES["notes.txt"]
    assert b"mine" not in (out / "main.c").read_bytes() and b"mine" not in (out / "Makefile").read_bytes()
    assert not (out / "params.bin").is_symlink() and not (tmp_path / "elsewhere.bin").exists()
    assert not temporaries(tmp_path)


@pytest.mark.parametrize("case", ["new", "new-parents", "empty", "forced"])
def test_a_failure_mid_export_leaves_the_folder_as_it_was(tmp_path, monkeypatch, case):
    out = {"new": tmp_path / "lib", "new-parents": tmp_path / "a" / "b" / "lib", "empty": tmp_path / "lib",
           "forced": tmp_path / "lib"}[case]
    if case == "empty":
        out.mkdir()
    if case == "forced":
        user_folder(out)
    before = snapshot(tmp_path)
    original = export._write_file

    def disk_full(path, write):
        if path.name == "main.c":  # after model.h and model.c, half-way through main.c
            path.write_bytes(b"/* half a fi")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        original(path, write)
    monkeypatch.setattr(export, "_write_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export.export_model(tiny(), out, "float64", force=case == "forced")
    assert snapshot(tmp_path) == before and not temporaries(tmp_path)


def test_a_file_target_or_a_folder_in_the_way_is_refused(tmp_path):
    target = tmp_path / "lib"
    target.write_text("a file")
    with pytest.raises(export.ExportError, match="exists and is not a folder"):
        export.export_model(tiny(), target, "float64", force=True)
    out = tmp_path / "out"
    (out / "main.c").mkdir(parents=True)
    before = snapshot(tmp_path)
    with pytest.raises(export.ExportError, match="'main.c' is a folder"):
        export.export_model(tiny(), out, "float64", force=True)
    assert snapshot(tmp_path) == before


def test_an_unwritable_parent_puts_the_temporary_folder_inside(tmp_path, monkeypatch):
    out = user_folder(tmp_path / "mnt")
    real = export.tempfile.mkdtemp

    def mkdtemp(prefix, suffix, dir):
        if Path(dir) == out.parent:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(prefix=prefix, suffix=suffix, dir=dir)
    monkeypatch.setattr(export.tempfile, "mkdtemp", mkdtemp)
    export.export_model(tiny(), out, "float64", force=True)
    assert {p.name for p in out.iterdir()} == FILES | {"notes.txt"} and not temporaries(tmp_path)


def test_temporary_folders_of_killed_exports_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    orphan = tmp_path / f".lib.{dead.stdout.strip()}.abc{export.TEMP_SUFFIX}"
    orphan.mkdir()
    (orphan / "model.c").write_text("partial")
    live = tmp_path / f".lib.1.abc{export.TEMP_SUFFIX}"  # pid 1 is alive: another export's, kept
    live.mkdir()
    export.export_model(tiny(), tmp_path / "lib", "float64")
    assert not orphan.exists() and live.is_dir()


def test_cli_refuses_a_non_empty_folder_unless_forced(tmp_path, capsys, build_dir):
    spec = tmp_path / "spec.py"
    spec.write_text("import bpcompile as bp\n"
                    "def build():\n"
                    "    g = bp.Graph('tiny')\n"
                    "    x = g.input('x', ('batch', 3))\n"
                    "    t = g.input('t', ('batch', 2))\n"
                    "    w = g.param('W', (3, 2))\n"
                    "    g.loss(bp.mse(bp.tanh(x @ w), t))\n"
                    "    return g\n")
    out = user_folder(tmp_path / "lib")
    before = snapshot(out)
    capsys.readouterr()
    assert main(["export", str(spec), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err and "main.c, Makefile" in err and "--force" in err
    assert snapshot(out) == before
    assert main(["export", str(spec), "-o", str(out), "--force"]) == 0
    assert "Exported model 'tiny'" in capsys.readouterr().out
    assert (out / "notes.txt").read_bytes() == USER_FILES["notes.txt"] and b"mine" not in (out / "main.c").read_bytes()
