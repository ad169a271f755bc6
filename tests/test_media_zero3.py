"""ZeRO-3 on 2 ranks whose batches hold different media (rank 0 only videos, rank 1 only text, then the other way
round): no hang, and every step's loss equals one process's on the same global batches.

Multimodal ZeRO-3 training is known to hang when one rank's batch skips a tower the others run (DeepSpeed #7170,
transformers #37186, LLaMA-Factory #7136): every gathered parameter waits for every rank. mmscale runs each encoder
on every rank every step (mmscale.media.base)."""

from __future__ import annotations

import json

import pytest

from mmscale.data.media_demo import write_media_demo
from mmscale.data.tokenizer import train_sentencepiece
from test_training import ROOT, launch, losses

RUN_MEDIA = ROOT / "tests/dist/run_media.py"


@pytest.mark.slow
def test_ranks_with_different_media_match_one_process(tmp_path):
    tok = train_sentencepiece(["a red blue circle square moves left right up down hello world one two three four"],
                              tmp_path / "tok", 64, extra_symbols=["<video>"])
    shard = write_media_demo("video", tmp_path / "v", 4, 0, samples_per_shard=4, frames=4, size=32)["train"][0]
    common = [f"data.tokenizer={tok}", f"data.train_shards={shard}", "media.video.frames=4", "data.text_only=true",
              "train.max_steps=4", "train.checkpoint_every=0", "train.global_batch_size=8",
              "train.micro_batch_size=4", "deepspeed.zero_stage=3", "model.xattn.gate_init=1.0",
              "model.train_vision=true", "deepspeed.collective_timeout_s=120"]
    launch(RUN_MEDIA, [str(tmp_path / "two.json"), f"output_dir={tmp_path / 'two'}", *common], nprocs=2, timeout=400)
    launch(RUN_MEDIA, [str(tmp_path / "one.json"), f"output_dir={tmp_path / 'one'}", *common], nprocs=1, timeout=400)
    two, one = losses(tmp_path / "two.json"), losses(tmp_path / "one.json")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    for step in one:  # fp32, another reduction order: ~1e-7 per step, amplified by Adam over 4 steps
        assert two[step] == pytest.approx(one[step], rel=1e-4), (step, two, one)
    assert json.loads((tmp_path / "two.json").read_text())["world_size"] == 2
