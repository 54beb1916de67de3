"""`flywheel run` refuses a bad configuration before it touches the store or starts a worker."""

import pytest
from typer.testing import CliRunner

from app import flywheel_cli
from app.cli import app


def run(*args: str):
    return CliRunner().invoke(app, ["flywheel", "run", *args])


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A data root that must stay empty: nothing is migrated or started."""
    monkeypatch.setenv("RR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RR_DATABASE_URL", f"sqlite:///{tmp_path / 'data' / 'store.db'}")
    return tmp_path / "data"


def test_an_unknown_backend_is_named_and_nothing_is_created(data_dir):
    result = run("--backend", "llamacpp")
    assert result.exit_code == 2
    assert "'llamacpp'" in result.output and "vllm" in result.output
    assert not data_dir.exists()


def test_an_unknown_prompt_style_is_named(data_dir):
    result = run("--prompt-style", "fim")
    assert result.exit_code == 2
    assert "'fim'" in result.output
    assert not data_dir.exists()


def test_vllm_with_local_workers_needs_vllm_here(data_dir, monkeypatch):
    # Stands in for a machine without vLLM, whether or not this one has it.
    monkeypatch.setattr(flywheel_cli, "find_spec", lambda name: None)
    result = run("--backend", "vllm")
    assert result.exit_code == 2
    assert "needs vLLM" in result.output and "--no-start-workers" in result.output
    assert not data_dir.exists()
