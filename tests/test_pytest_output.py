"""The README's test command must say how many tests passed: pytest's own "-q" in the settings would hide it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pytest_q_prints_the_passed_count(tmp_path):
    (tmp_path / "test_one.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
                             str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path / "test_one.py")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "1 passed" in result.stdout
