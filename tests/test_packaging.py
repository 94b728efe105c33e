"""A non-editable ``pip install .`` into a clean virtual environment (SPEC A.2)."""
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_keeps_folders_inside_the_namespace(tmp_path):
    venv = tmp_path / "venv"
    # system site packages give torch without a 5 GB copy; the venv's own site-packages come first
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    build = tmp_path / "src"
    # copy the tracked tree so a stale build/ or egg-info of the checkout cannot leak in
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"], check=True,
                           capture_output=True, text=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file():
            dst = build / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(build)],
                   check=True, cwd=tmp_path)
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    assert site != Path(sysconfig.get_paths()["purelib"])
    cu = sorted(p.name for p in (site / "alr_fast" / "kernels").glob("*.cu"))
    assert cu == sorted(p.name for p in (ROOT / "kernels").glob("*.cu")) and cu, cu  # kernel sources ship
    for bare in ("kernels", "pipelines", "bench", "configs"):
        assert not (site / bare).exists(), f"a bare top-level '{bare}' was installed"
    probe = (
        "import alr_fast, alr_fast.pipelines, alr_fast.kernels, alr_fast.bench, alr_fast.config as c;"
        "import alr_fast.kernels.reference, alr_fast.pipelines.sampler;"
        "print(alr_fast.kernels.__file__); print(len(c.bundled_config_names()))"
    )
    out = subprocess.run([str(py), "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path).stdout.split()
    assert out[0].startswith(str(site)), out[0]
    assert int(out[1]) == 10  # nine dataset x backbone recipes and quickstart
    help_text = subprocess.run([str(venv / "bin" / "alr-fast"), "--help"], check=True, capture_output=True, text=True).stdout
    for command in ("train", "evaluate", "make-synthetic", "quickstart"):
        assert command in help_text
