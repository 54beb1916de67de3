"""Resumable reward training: a run killed mid-way and resumed from its newest
complete checkpoint ends with the model an uninterrupted run gives (same steps,
same batches, same seed), for the CPU default and for TRL's trainer; a
half-written checkpoint is never used."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.checkpoints import COMPLETE, Checkpoints
from pipelines.reward_model import train_reward_model
from tests.pipelines.test_reward_model import separable_pairs, tiny_config


class Killed(Exception):
    """The worker dies here."""


def kill_at(fraction: float):
    def progress(done: float) -> None:
        if done >= fraction:
            raise Killed

    return progress


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("method", ["top", "full"])
def test_an_interrupted_training_resumes_to_the_same_model(method, tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, method=method, epochs=3)
    pairs = separable_pairs(24)
    whole = train_reward_model(pairs, config, tmp_path / "whole")

    checkpoints = Checkpoints(tmp_path / "checkpoints", every_s=0.0)  # every step
    with pytest.raises(Killed):
        train_reward_model(
            pairs, config, tmp_path / "first", progress=kill_at(0.5), checkpoints=checkpoints
        )
    saved = checkpoints.latest()
    assert saved is not None and saved.name != "checkpoint-0"
    resumed = train_reward_model(pairs, config, tmp_path / "resumed", checkpoints=checkpoints)

    assert resumed["resumed_from_step"] == int(saved.name.split("-")[1]) > 0
    assert whole["resumed_from_step"] is None
    before, after = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert resumed["train_pairs"] == whole["train_pairs"]


def test_a_half_written_checkpoint_is_never_used(tmp_path):
    checkpoints = Checkpoints(tmp_path, every_s=0.0)
    checkpoints.save(3, lambda folder: (folder / "state").write_text("step 3"))
    # A worker killed while writing step 5: the folder is there, its marker is not.
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "state").write_text("half")
    (tmp_path / ".checkpoint-6.tmp").mkdir()
    assert checkpoints.latest() == tmp_path / "checkpoint-3"
    assert (checkpoints.latest() / COMPLETE).read_text().strip() == "3"
    # A newer complete one replaces the older.
    checkpoints.save(7, lambda folder: (folder / "state").write_text("step 7"))
    assert checkpoints.latest() == tmp_path / "checkpoint-7"
    assert not (tmp_path / "checkpoint-3").exists()
