"""`kssm convert`'s output folder and command line. OUT_DIR is written aside and renamed in,
replaced only with --force, and nothing nobody asked to replace is lost (a folder appearing
meanwhile, kill -9, symlinks, a full disk); bad input at the CLI is one line and exit code 2,
with nothing written."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from convert_helpers import (
    convert_in_a_process,
    run_cli,
    source_weights,
    state_dict,
    training_checkpoint,
)
from torch_zip_writer import (
    Global,
    Reduce,
    pickle_checkpoint,
    tensor,
    write_checkpoint,
    write_pickle_archive,
)

import mlx_kssm
from mlx_kssm.checkpoints_convert.convert import convert
from mlx_kssm.checkpoints_convert.torch_zip import CheckpointError

# -- the output folder: written aside, renamed in, nothing lost --------------------------------


def test_out_dir_is_only_replaced_with_force(tmp_path):
    src = write_checkpoint(tmp_path / "s.pt", state_dict(source_weights()))
    out = tmp_path / "out"
    convert(src, out)
    with pytest.raises(CheckpointError, match="not empty; pass --force"):
        convert(src, out, monostable=True)
    assert json.loads((out / "config.json").read_text())["bistable"] is True
    convert(src, out, monostable=True, force=True)
    assert json.loads((out / "config.json").read_text())["bistable"] is False
    (tmp_path / "empty").mkdir()
    convert(src, tmp_path / "empty")  # an empty folder is fine without --force


def test_force_never_deletes_unrelated_files(tmp_path):
    src = write_checkpoint(tmp_path / "s.pt", state_dict(source_weights()))
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(CheckpointError, match="thesis.tex"):
        convert(src, precious, force=True)
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "s.pt"]


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    """A disk that fills up half-way through: an error, no OUT_DIR, no temporary folder."""
    real_save = mx.save_safetensors

    def fill_up(path, arrays, **kwargs):
        if Path(path).name == "optimizer.safetensors":
            Path(path).write_bytes(b"half")
            raise RuntimeError("[write] Unable to write 8 bytes to file.")
        real_save(path, arrays, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", fill_up)
    src = write_checkpoint(tmp_path / "s.pt", training_checkpoint(source_weights()))
    with pytest.raises(CheckpointError, match="cannot write .*out: .*Unable to write"):
        convert(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]


def appearing_out(monkeypatch, out: Path, **files):
    """Make ``out`` appear (with ``files``) while the conversion writes its temporary folder."""
    import mlx_kssm.checkpoints_convert.convert as module

    real = module.write_model_files

    def write_and_race(model, folder, dtype=None):
        real(model, folder, dtype=dtype)
        out.mkdir(exist_ok=True)
        for name, text in files.items():
            (out / name).write_text(text)

    monkeypatch.setattr(module, "write_model_files", write_and_race)


@pytest.mark.parametrize("force", [False, True])
def test_a_folder_appearing_at_out_during_conversion_is_kept(tmp_path, monkeypatch, force):
    src = write_checkpoint(tmp_path / "s.pt", state_dict(source_weights()))
    out = tmp_path / "out"
    appearing_out(monkeypatch, out, **{"notes.txt": "mine"})
    result = run_cli(src, out, *(["--force"] if force else []))
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1
    assert ("--force" if force else "left untouched") in result.stderr
    assert {p.name: p.read_text() for p in out.iterdir()} == {"notes.txt": "mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "s.pt"]  # no temporaries


def test_an_empty_out_filled_during_conversion_is_kept(tmp_path, monkeypatch):
    src = write_checkpoint(tmp_path / "s.pt", state_dict(source_weights()))
    out = tmp_path / "out"
    out.mkdir()
    appearing_out(monkeypatch, out, **{"draft.md": "keep"})
    with pytest.raises(CheckpointError, match="created or filled by something else"):
        convert(src, out)
    assert (out / "draft.md").read_text() == "keep"


def test_a_conversion_killed_mid_write_is_cleaned_up_by_the_next(tmp_path):
    """kill -9 while the temporary folder holds the weights; the next conversion removes it."""
    src = write_checkpoint(tmp_path / "s.pt", training_checkpoint(source_weights()))
    out = tmp_path / "out"
    script = (
        "import sys, time\n"
        "import mlx_kssm.checkpoints_convert.convert as c\n"
        "real = c.write_model_files\n"
        "def stall(model, folder, dtype=None):\n"
        "    real(model, folder, dtype=dtype)\n"
        "    print(folder, flush=True)\n"
        "    time.sleep(120)\n"
        "c.write_model_files = stall\n"
        f"c.convert({str(src)!r}, {str(out)!r})\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    leftover = Path(child.stdout.readline().strip())
    child.kill()  # SIGKILL: no cleanup handler runs
    child.wait(timeout=60)
    child.stdout.close()
    assert (leftover / "model.safetensors").is_file() and leftover.name.startswith(".out.tmp-")
    report = convert(src, out)
    assert report.training_state and not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "s.pt"]


def test_a_symlinked_out_is_replaced_through_its_link(tmp_path):
    src = write_checkpoint(tmp_path / "s.pt", state_dict(source_weights()))
    real = tmp_path / "disk" / "model"
    convert(src, real)
    link = tmp_path / "out"
    link.symlink_to(real)
    convert(src, link, monostable=True, force=True)
    assert link.is_symlink() and json.loads((real / "config.json").read_text())["bistable"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "out", "s.pt"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["model"]  # no .model.old-PID
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="symbolic link to a folder that does not exist"):
        convert(src, dangling)
    assert not (tmp_path / "nowhere").exists()


# -- the command line: one-line errors, exit code 2, nothing written --------------------------


def test_cli_converts_and_says_what_it_did(tmp_path):
    src = write_checkpoint(tmp_path / "s.pt", training_checkpoint(source_weights()))
    result = run_cli(src, tmp_path / "out", "--monostable")
    assert result.exit_code == 0, result.output
    assert "vocab 128, hidden 32, 2 layers" in result.stdout and "monostable" in result.stdout
    assert "training state: step 3, next lr 0.001" in result.stdout
    assert mlx_kssm.load(tmp_path / "out").args.bistable is False


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list, str]]:
    """label -> (the arguments after `convert`, a piece of the expected message)."""
    good = write_checkpoint(tmp_path / "good.pt", state_dict(source_weights()))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:5000])
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19" + bytes(40))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    evil = pickle_checkpoint({"x": Global("posix", "system")})[0]
    evil = write_pickle_archive(tmp_path / "evil.pt", evil)
    other = write_checkpoint(tmp_path / "gpt.pt", {"lm_head.weight": tensor(np.zeros((4, 2)))})
    out = tmp_path / "out"
    return {
        "missing file": ([tmp_path / "nope.pt", out], "does not exist"),
        "truncated": ([cut, out], "corrupt or truncated"),
        "legacy format": ([legacy, out], "re-save it with torch >= 1.6"),
        "hostile": ([evil, out], "posix.system"),
        "another model": ([other, out], "do not map to this model: lm_head.weight"),
        "non-empty OUT_DIR": ([good, busy], "pass --force"),
        "bad dtype": ([good, out, "--dtype", "int8"], "float16, bfloat16"),
    }


@pytest.mark.parametrize(
    "label",
    [
        "missing file",
        "truncated",
        "legacy format",
        "hostile",
        "another model",
        "non-empty OUT_DIR",
        "bad dtype",
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, label):
    args, message = bad_inputs(tmp_path)[label]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = run_cli(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no OUT_DIR, no temp folder


def test_hostile_file_in_a_real_process(tmp_path):
    """The installed entry point itself: exit code 2, one line, the payload never runs."""
    marker = tmp_path / "pwned"
    payload = Reduce(eval, f"open({str(marker)!r}, 'w').close()")
    evil = write_pickle_archive(tmp_path / "evil.pt", pickle.dumps(payload, fix_imports=False))
    proc = convert_in_a_process(evil, tmp_path / "out", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "builtins.eval" in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
