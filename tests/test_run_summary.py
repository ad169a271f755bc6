"""Every run says what it did: each validation's figures in one log line, and at the end a summary (steps, wall time,
samples/s, final and best validation figures, the newest checkpoint, the next commands with this run's paths) in
the log and in `{output_dir}/summary.json`; a resumed run counts its own session's samples per second."""

from __future__ import annotations

import json

from test_training import ROOT, launch, tiny_data  # noqa: F401  (tiny_data is a fixture)


def test_a_run_ends_with_its_summary_and_each_validation_is_one_line(tiny_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    common = ["--config", "configs/tiny.yaml", *tiny_data, f"data.val_shards={tiny_data[0].split('=', 1)[1]}",
              "train.eval_every=2", "train.checkpoint_every=2", "data.num_workers=0"]
    r = launch(ROOT / "launchers/train.py", [*common, f"output_dir={out}", "train.max_steps=4"], nprocs=1)
    lines = [x for x in r.stderr.splitlines() if " mmscale.trainer: step " in x and " validation: val_loss " in x]
    assert [x.split(" validation:")[0].rsplit(" ", 1)[-1] for x in lines] == ["2", "4"], r.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == s["steps_this_session"] == 4 and s["samples"] == 32 and s["samples_per_s"] > 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    vals = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert s["final_validation"]["val_loss"] == vals[4]
    assert s["best_validation"]["val_loss"] == {"value": min(vals.values()), "step": min(vals, key=vals.get)}
    assert s["newest_checkpoint"].endswith("checkpoints/step_00000004")
    assert s["next"][0] == f"python launchers/evaluate.py --checkpoint {out}"
    assert any(c.startswith(f"python launchers/export.py --run {out} --out ") for c in s["next"])
    assert "run done: 4 steps in" in r.stderr and f"newest checkpoint: {out}" in r.stderr

    r = launch(ROOT / "launchers/train.py", [*common, f"output_dir={out}", "train.max_steps=6", "--resume"], nprocs=1)
    s = json.loads((out / "summary.json").read_text())
    assert (s["steps"], s["steps_this_session"], s["samples"]) == (6, 2, 48)
    assert "run done: 6 steps (2 in this session)" in r.stderr
