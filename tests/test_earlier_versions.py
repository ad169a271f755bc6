"""What earlier versions wrote still opens: a run's recorded config with the loss weights objectives replaced, a
classification head stored under its old name, a checkpoint's config without the fields added since."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmscale.config import ConfigError, JobConfig
from mmscale.job.preflight import config_from_dict

ROOT = Path(__file__).resolve().parents[1]


def test_a_recorded_config_with_the_old_loss_weights_reads_as_objectives():
    raw = {"model": {"preset": "tiny", "num_classes": 4}, "data": {"synthetic_train_samples": 8, "image_size": 32},
           "train": {"lm_loss_weight": 0.0, "cls_loss_weight": 1.0}}
    cfg = config_from_dict(raw, check_paths=False, recorded=True)
    assert cfg.objectives == {"captioning": {"weight": 0.0}, "classification": {"weight": 1.0}}
    plain = config_from_dict({**raw, "train": {"lm_loss_weight": 1.0, "cls_loss_weight": 0.0}}, check_paths=False,
                             recorded=True)
    assert plain.objectives == {}  # the defaults: captioning, and the head measured
    with pytest.raises(ConfigError) as e:  # given now, the old key is refused with the new one named
        config_from_dict(raw, check_paths=False)
    assert "train.lm_loss_weight: 0.0; this key is now objectives.captioning.weight" in str(e.value)
    assert "write objectives.classification.weight=1.0" in str(e.value)
    assert "unknown key" not in str(e.value)


def test_a_head_stored_under_its_old_name_is_read_under_todays(tmp_path):
    from safetensors.torch import save_file

    from mmscale.training.readers import SafetensorsReader

    head, active = torch.randn(4, 8), torch.tensor([True, False, True, True])
    save_file({"classifier.weight": head, "active_classes": active, "lm.x": torch.ones(2)},
              str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(tmp_path)
    assert set(reader.names) == {"objectives.classification.head.weight", "objectives.classification.active_classes",
                                 "lm.x"}
    assert "objectives.classification.head.weight" in reader and reader.shape("objectives.classification.head.weight") == (4, 8)
    assert torch.equal(reader.read("objectives.classification.head.weight"), head)
    assert torch.equal(reader.read("objectives.classification.active_classes"), active)


def test_fields_added_since_a_checkpoint_are_no_change_on_resume_while_at_their_default():
    from mmscale.training.trainer import config_changes

    now = JobConfig().to_dict()
    saved = JobConfig().to_dict()
    del saved["model"]["lm"]["train_top_layers"], saved["model"]["xattn"]["dropout"], saved["objectives"]
    assert config_changes(saved, now) == []
    now["model"]["lm"]["train_top_layers"] = 2  # a real change of a fixed field is still refused
    assert any("model.lm.train_top_layers" in p for p in config_changes(saved, now))
