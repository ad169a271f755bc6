"""The classification objective: `.cls` labels from the shards, a head on the pooled multimodal features,
cross-entropy beside or instead of the captioning loss, accuracy per class; real handwritten digits."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmscale.data.collate import IGNORE_INDEX
from mmscale.data.pipeline import SampleError, decode_sample
from test_training import ROOT, RUN_TINY, launch, tiny_data  # noqa: F401  (tiny_data is a fixture)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_cls_member_is_read_and_checked():
    args = (16, (0.5,) * 3, (0.5,) * 3)
    s = decode_sample({"__key__": "a", "png": _png(), "cls": b"7"}, *args)  # no caption: classification data
    assert s["class_label"] == 7 and s["caption"] == ""
    s = decode_sample({"__key__": "b", "png": _png(), "txt": b"a red square"}, *args)
    assert s["class_label"] == IGNORE_INDEX and s["caption"] == "a red square"
    with pytest.raises(SampleError, match="not an integer"):
        decode_sample({"__key__": "c", "png": _png(), "cls": b"seven"}, *args)
    with pytest.raises(SampleError, match="negative"):
        decode_sample({"__key__": "d", "png": _png(), "cls": b"-1"}, *args)
    with pytest.raises(SampleError, match="no caption .* and no class label"):
        decode_sample({"__key__": "e", "png": _png()}, *args)


def _model(num_classes: int):
    from mmscale.job.preflight import load_config
    from mmscale.job.build import model_recipe

    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"model.num_classes={num_classes}"], check_paths=False)
    return model_recipe(cfg).build(64).eval()


def _batch(b: int = 3, length: int = 6) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(1, 64, (b, length))
    attention = torch.ones(b, length, dtype=torch.long)
    attention[0, 4:] = 0  # a padded sample
    return dict(pixel_values=torch.randn(b, 1, 3, 32, 32), image_mask=torch.ones(b, 1, dtype=torch.bool),
                input_ids=ids, attention_mask=attention, media_index=torch.zeros(b, length, dtype=torch.long),
                labels=ids.masked_fill(attention == 0, IGNORE_INDEX))


@torch.no_grad()
def test_head_pools_attended_positions_and_masks_inactive_classes():
    model = _model(5)
    batch = _batch()
    labels = torch.tensor([2, IGNORE_INDEX, 4])
    terms = model(**batch, class_labels=labels).terms["classification"]  # (mmscale.objectives.classification)
    assert terms["logits"].shape == (3, 5)
    # the sums are exactly cross-entropy over the labelled samples, and the count of right answers
    expected = F.cross_entropy(terms["logits"][[0, 2]], labels[[0, 2]], reduction="sum")
    assert torch.allclose(terms["loss_sum"], expected) and int(terms["count"]) == 2
    assert int(terms["correct"]) == int((terms["logits"][[0, 2]].argmax(-1) == labels[[0, 2]]).sum())
    # padding does not move a sample's class logits: the pooled mean covers the attended positions only
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][0, 4:] = 7
    assert torch.allclose(model(**changed).terms["classification"]["logits"][0], terms["logits"][0], atol=1e-5)
    # class-incremental: a class not yet active is never predicted
    model.objectives["classification"].set_active_classes([0, 1, 2])
    masked = model(**batch, class_labels=labels).terms["classification"]["logits"]
    assert (masked.argmax(-1) < 3).all() and torch.equal(masked[:, :3], terms["logits"][:, :3])


def test_loss_weights_are_checked():
    from mmscale.config import ConfigError
    from mmscale.job.preflight import load_config

    with pytest.raises(ConfigError, match="objectives.classification: needs model.num_classes"):
        load_config(ROOT / "configs/tiny.yaml", ["objectives.classification.weight=1"], check_paths=False)
    with pytest.raises(ConfigError, match="every weight is 0 .*nothing to train"):
        load_config(ROOT / "configs/tiny.yaml", ["objectives.captioning.weight=0"], check_paths=False)
    with pytest.raises(ConfigError, match="objectives.captioning.weight: -1.0 must be >= 0"):
        load_config(ROOT / "configs/tiny.yaml", ["objectives.captioning.weight=-1"], check_paths=False)
    with pytest.raises(ConfigError, match="objectives.ranking: unknown objective 'ranking'. Registered: "):
        load_config(ROOT / "configs/tiny.yaml", ["objectives.ranking.weight=1"], check_paths=False)
    with pytest.raises(ConfigError, match="objectives.captioning.wieght: unknown key"):
        load_config(ROOT / "configs/tiny.yaml", ["objectives.captioning.wieght=1"], check_paths=False)


def test_digits_shards_are_the_real_scans_split_without_overlap(tmp_path):
    from sklearn.datasets import load_digits

    from mmscale.data.digits import write_digits_shards
    from mmscale.data.pipeline import tar_samples
    from mmscale.data.pipeline import SkipCounter

    n_train = write_digits_shards(tmp_path / "train", "train", classes=[3, 8])
    n_val = write_digits_shards(tmp_path / "val", "val", classes=[3, 8])
    d = load_digits()
    assert n_train + n_val == int(((d.target == 3) | (d.target == 8)).sum())
    keys = {}
    for split in ("train", "val"):
        samples = list(tar_samples(sorted(str(p) for p in (tmp_path / split).glob("*.tar")), SkipCounter()))
        keys[split] = {s["__key__"] for s in samples}
        for s in samples[:20]:  # the label is the scan's own, the image the scan (dark ink where the scan is high)
            i = int(s["__key__"].removeprefix("digit"))
            assert int(s["cls"]) == int(d.target[i])
            img = torch.tensor(list(Image.open(io.BytesIO(s["png"])).convert("L").resize((8, 8)).getdata())).view(8, 8)
            ink = torch.tensor(d.images[i]) > 8
            assert img[ink].float().mean() < img[~ink].float().mean() - 60
    assert len(keys["train"]) == n_train and not keys["train"] & keys["val"]


@pytest.mark.slow
def test_digit_classification_two_ranks_match_one_process(tiny_data, tmp_path):  # noqa: F811
    """Classification instead of captioning on real digits (4 classes): 2 ranks under ZeRO-3 against 1 process
    on the same global batches give the same classification losses, the loss falls, and validation reports
    accuracy per class."""
    from mmscale.data.digits import write_digits_shards

    write_digits_shards(tmp_path / "train", "train", classes=[0, 1, 2, 3])
    write_digits_shards(tmp_path / "val", "val", classes=[0, 1, 2, 3], samples_per_shard=20)
    tokenizer = next(a for a in tiny_data if a.startswith("data.tokenizer="))
    common = [f"data.train_shards={tmp_path / 'train'}", f"data.val_shards={tmp_path / 'val'}", tokenizer,
              "model.num_classes=4", "objectives={captioning: {weight: 0}, classification: {weight: 1}}", "train.max_steps=40",
              "train.lr=3e-3", "train.warmup_steps=1", "train.checkpoint_every=0", "train.global_batch_size=16",
              "train.micro_batch_size=8", "train.eval_batches=4", "deepspeed.stage3_param_persistence_threshold=0",
              "data.num_workers=0", "--same-global-batches"]
    launch(RUN_TINY, [str(tmp_path / "two.json"), f"output_dir={tmp_path / 'two'}", *common], nprocs=2)
    launch(RUN_TINY, [str(tmp_path / "one.json"), f"output_dir={tmp_path / 'one'}", *common], nprocs=1)
    runs = {n: json.loads((tmp_path / f"{n}.json").read_text())["history"] for n in ("two", "one")}
    cls = {n: [h["cls_loss"] for h in hist if "cls_loss" in h] for n, hist in runs.items()}
    # it learns: per-step losses of 16 samples are noisy, so the mean of the last 10 steps against the first 10
    assert len(cls["two"]) == 40 and sum(cls["two"][-10:]) < sum(cls["two"][:10]), cls
    assert cls["two"] == pytest.approx(cls["one"], rel=1e-4), cls
    val = [h for h in runs["two"] if "val_acc" in h][-1]
    assert len(val["val_acc_per_class"]) == 4 and 0 <= val["val_acc"] <= 1
    assert val["val_acc"] > 0.4, val  # above chance (0.25) by 2 sd of 32 validation samples after 40 steps


def two_digit_tasks(root, steps: int, train_per_shard: int = 200) -> list[str]:
    """Class-incremental real digits, {0, 1} then {2, 3}, `steps` optimizer steps each, written under `root`; the
    overrides every such run shares: the task sequence, accuracy as R's metric, a 4-class head trained alone."""
    from mmscale.data.digits import write_digits_shards

    for name, classes in (("a", [0, 1]), ("b", [2, 3])):
        write_digits_shards(root / name / "train", "train", classes=classes, samples_per_shard=train_per_shard)
        write_digits_shards(root / name / "val", "val", classes=classes, samples_per_shard=20)
    tasks = ", ".join(f"{{name: {n}, train_shards: {root / n / 'train'}, val_shards: {root / n / 'val'}, "
                      f"max_steps: {steps}, classes: {c}}}" for n, c in (("a", [0, 1]), ("b", [2, 3])))
    return [f"continual.tasks=[{tasks}]", "continual.metric=val_acc", "model.num_classes=4", "model.train_vision=true",
            "objectives={captioning: {weight: 0}, classification: {weight: 1}}", f"train.max_steps={2 * steps}"]


@pytest.mark.slow
def test_task_sequence_resumed_mid_task_ends_with_the_same_matrix(tiny_data, tmp_path):  # noqa: F811
    """Class-incremental digits, {0, 1} then {2, 3}, 2 ranks under ZeRO-3: after each task every task is evaluated
    (R); while task 1 trains, task 2's classes are masked out of the head (accuracy 0 on them). A run stopped in
    the middle of task 2 and resumed ends with the same R as an uninterrupted one."""
    tokenizer = next(a for a in tiny_data if a.startswith("data.tokenizer="))
    common = [tokenizer, *two_digit_tasks(tmp_path, 20, train_per_shard=40), "train.lr=3e-3", "train.warmup_steps=1",
              "train.checkpoint_every=5", "train.global_batch_size=16",
              "train.micro_batch_size=8", "train.eval_batches=2", "data.num_workers=0",
              "deepspeed.stage3_param_persistence_threshold=0",
              # the task-end measurements are not validations: an early stopping sees none of them (were they fed
              # to it, task b's 0.0 after task a would stop the run there)
              "callbacks=[{name: early_stopping, args: {metric: val_acc, patience: 1, mode: max}}]"]
    launch(RUN_TINY, [str(tmp_path / "full.json"), f"output_dir={tmp_path / 'full'}", *common], nprocs=2)
    launch(RUN_TINY, [str(tmp_path / "a.json"), f"output_dir={tmp_path / 'cut'}", "--stop-at", "32", *common], nprocs=2)
    assert not (tmp_path / "cut/continual.json").exists()  # stopped before the sequence ended
    launch(RUN_TINY, [str(tmp_path / "b.json"), f"output_dir={tmp_path / 'cut'}", "--resume", *common], nprocs=2)
    full = json.loads((tmp_path / "full/continual.json").read_text())
    cut = json.loads((tmp_path / "cut/continual.json").read_text())
    assert full["tasks"] == ["a", "b"] and len(full["matrix"]) == 2
    assert full["matrix"][0][1] == 0.0  # task b's classes were not active while task a trained
    assert full["matrix"][0][0] > 0.6 and full["matrix"][1][1] > 0.4, full["matrix"]  # each task was learned
    flat = [[v for row in m["matrix"] for v in row] for m in (cut, full)]
    assert flat[0] == pytest.approx(flat[1], abs=1e-9), (cut["matrix"], full["matrix"])
    assert (tmp_path / "full/continual.png").stat().st_size > 1000


def test_task_sequence_config_is_checked():
    from mmscale.config import ConfigError
    from mmscale.job.preflight import load_config

    tasks = "continual.tasks=[{name: a, train_shards: x, val_shards: y, max_steps: 5, classes: [0, 9]}, {name: a}]"
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/tiny.yaml", [tasks, "model.num_classes=4", "continual.metric=val_acc"],
                    check_paths=False)
    text = "\n".join(e.value.problems)
    assert "continual.tasks[1].name: 'a': every task needs a name of its own" in text
    assert "continual.tasks[1].train_shards: empty" in text and "continual.tasks[1].max_steps: 0 must be >= 1" in text
    assert "continual.tasks[0].classes: [9] outside 0..model.num_classes-1 (4)" in text
    assert "train.max_steps: 10, but the tasks' max_steps add up to 5; set train.max_steps=5" in text
    assert "data.tokenizer: empty; a task sequence reads your own shards" in text
    with pytest.raises(ConfigError, match="continual.tasks gives every task its own shards; drop data.val_shards"):
        load_config(ROOT / "configs/tiny.yaml", ["continual.tasks=[{name: a, train_shards: x, val_shards: y, "
                                                 "max_steps: 10}]", "data.tokenizer=t", "data.val_shards=v"],
                    check_paths=False)
