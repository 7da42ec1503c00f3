"""notebooks/lora_lab.ipynb: committed without outputs, and run top to bottom on the tiny model and the small E2E
folder, every cell (its asserts included) without an error."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "lora_lab.ipynb"


def test_the_committed_notebook_has_no_outputs():
    """Outputs are made by running it; committed, they would go stale and bloat every diff."""
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert len(code) > 10
    assert [(cell.get("outputs"), cell.get("execution_count")) for cell in code] == [([], None)] * len(code)
    assert all("execution" not in cell.get("metadata", {}) for cell in notebook["cells"])


@pytest.mark.tokenizer
def test_the_notebook_runs_top_to_bottom_on_the_tiny_model(tiny_gpt2, e2e_small, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="executing the notebook needs nbclient (requirements-dev.txt)")
    nbformat = pytest.importorskip("nbformat", reason="executing the notebook needs nbformat (requirements-dev.txt)")
    pytest.importorskip("ipykernel", reason="executing the notebook needs ipykernel (requirements-dev.txt)")
    pytest.importorskip("matplotlib", reason="the notebook draws its plots with matplotlib")
    out = tmp_path / "run"
    # The notebook's settings cell reads these: the kernel it runs in inherits this process's environment.
    for name, value in dict(MODEL=tiny_gpt2, DATA=e2e_small, STEPS=10, BATCH_SIZE=4, DEVICE="cpu", OUT=out).items():
        monkeypatch.setenv(f"LORA_LAB_{name}", str(value))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # a cell that raises (an assert too) raises CellExecutionError here, with its traceback
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == list(range(1, 11))
    assert [line["step"] for line in log if "val_loss" in line] == [2, 4, 6, 8, 10]
    for made in ["loss.png", "adapter.safetensors", "peft/adapter_config.json", "analysis/deltaw_layer1_q.png"]:
        assert (out / made).is_file(), made
    images = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
              if "image/png" in output.get("data", {})]
    assert len(images) == 2  # the loss curves and the section 7 heatmap, shown in the notebook
