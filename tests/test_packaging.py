"""A non-editable ``pip install .`` into a clean virtual environment (see the README's Layout).

The child environment must see the same third-party packages as the interpreter running the
tests, whether that is a virtual environment or the system one: ``--system-site-packages``
would give the *base* interpreter's packages (none, in a fresh venv). So the child venv gets
its own site-packages first and the outer interpreter's site-packages after it, through a
``.pth`` file of plain paths (their own ``.pth`` files, such as an editable install of this
project, are not executed).
"""
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, **kwargs) -> str:
    """Run ``cmd``; on failure the assertion shows the child's stdout and stderr."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )
    return proc.stdout


def _outer_site_dirs() -> list[str]:
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    return list(dict.fromkeys(d for d in dirs if Path(d).is_dir()))


def _tracked_tree(dst: Path) -> int:
    """Copy the files git tracks (nothing untracked: no .venv/, build/ or egg-info) to ``dst``."""
    files = _run(["git", "-C", ROOT, "ls-files", "-z"]).split("\0")
    count = 0
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():  # a tracked file deleted in the working tree is skipped
            target = dst / f
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(src.read_bytes())
            count += 1
    return count


@pytest.mark.slow
def test_non_editable_install_keeps_folders_inside_the_namespace(tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    site_dir = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    outer = _outer_site_dirs()
    assert site_dir not in map(Path, outer)
    (site_dir / "_outer_env.pth").write_text("".join(f"{d}\n" for d in outer))
    build = tmp_path / "src"
    assert _tracked_tree(build) > 0
    _run([py, "-m", "pip", "install", "--no-deps", "-q", build], cwd=tmp_path)
    cu = sorted(p.name for p in (site_dir / "alr_fast" / "kernels").glob("*.cu"))
    assert cu == sorted(p.name for p in (ROOT / "kernels").glob("*.cu")) and cu, cu  # kernel sources ship
    for bare in ("kernels", "pipelines", "bench", "configs"):
        assert not (site_dir / bare).exists(), f"a bare top-level '{bare}' was installed"
    probe = (
        "import alr_fast, alr_fast.pipelines, alr_fast.kernels, alr_fast.bench, alr_fast.config as c;"
        "import alr_fast.kernels.reference, alr_fast.pipelines.sampler;"
        "print(alr_fast.kernels.__file__); print(len(c.bundled_config_names()))"
    )
    out = _run([py, "-c", probe], cwd=tmp_path).split()
    assert out[0].startswith(str(site_dir)), out[0]
    assert int(out[1]) == len(list((ROOT / "configs").glob("*.yaml")))  # every bundled recipe ships
    help_text = _run([venv / "bin" / "alr-fast", "--help"], cwd=tmp_path)
    for command in ("train", "evaluate", "make-synthetic", "quickstart"):
        assert command in help_text
