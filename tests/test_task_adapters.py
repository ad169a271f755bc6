"""Dynamic architecture for continual learning (`task_adapters`, issue 20 part 1): one LoRA adapter and one head per
task; the shared weights train in the first task only; a finished task's module never changes again (its learning
rate is 0 outside its task, so Adam leaves it exactly as it is); each task is evaluated through its own module; a
2-rank ZeRO-3 run resumed in the middle of the second task ends with the uninterrupted run's matrix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmscale.config import ConfigError
from mmscale.job.build import model_recipe
from mmscale.job.preflight import load_config
from test_classification import two_digit_tasks
from test_training import ROOT, RUN_TINY, launch, tiny_data  # noqa: F401  (tiny_data is a fixture)

TINY = ROOT / "configs" / "tiny.yaml"
TASKS = ("continual.tasks=[{name: a, train_shards: x, val_shards: y, max_steps: 3, classes: [0, 1]}, "
         "{name: b, train_shards: x, val_shards: y, max_steps: 4, classes: [2, 3]}]")
CLS = ["model.num_classes=4", "data.tokenizer=tok.model", "continual.metric=val_acc", "train.max_steps=7",
       "objectives={captioning: {weight: 0}, classification: {weight: 1}}", "model.xattn.backend=sdpa",
       "model.xattn.gate_init=1.0"]


def _model(*overrides: str):
    cfg = load_config(TINY, [TASKS, *CLS, "callbacks=[{name: task_adapters, args: {r: 4}}]", *overrides],
                      check_paths=False)
    recipe = model_recipe(cfg)
    torch.manual_seed(0)
    model = recipe.build(64)
    recipe.finish(model)
    return cfg, model


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (4, 8), generator=g)
    return {"pixel_values": torch.randn(4, 1, 3, 32, 32, generator=g), "image_mask": torch.ones(4, 1, dtype=torch.bool),
            "input_ids": ids, "attention_mask": torch.ones_like(ids), "media_index": torch.zeros_like(ids),
            "labels": torch.full_like(ids, -100), "class_labels": torch.tensor([0, 1, 2, 3])}


def test_config_is_checked():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["callbacks=[{name: task_adapters}, {name: lora}]"], check_paths=False)
    text = str(e.value)
    assert "task_adapters gives each task of continual.tasks its own adapter; set continual.tasks" in text
    assert "task_adapters builds its own LoRA adapters; take ['lora'] out of callbacks" in text
    with pytest.raises(ConfigError, match="method: 'ia3'; task_adapters builds LoRA adapters"):
        load_config(TINY, [TASKS, *CLS, "callbacks=[{name: task_adapters, args: {method: ia3}}]"], check_paths=False)


def test_each_task_has_its_own_module_and_its_own_steps():
    from mmscale.callbacks.task_adapters import TaskHeads, select_task
    from mmscale.training.engine import LR_STEPS, build_optimizer, lr_lambdas

    cfg, model = _model()
    assert model.task_names == ["a", "b"]
    head = model.objectives["classification"].head
    assert isinstance(head, TaskHeads) and len(head.heads) == 2
    adapters = {n for n, _ in model.named_parameters() if "lora_A.task" in n}
    assert {n.rsplit(".", 2)[-2] for n in adapters} == {"task0", "task1"}
    assert any(".xattn." in n for n in adapters) and any("q_proj" in n for n in adapters)  # LM and cross-attention
    spans = {n: getattr(p, LR_STEPS) for n, p in model.named_parameters() if p.requires_grad}
    assert all(spans[n] == (0, 3) for n in spans if ".task0." in n or ".heads.0." in n)
    assert all(spans[n] == (3, 7) for n in spans if ".task1." in n or ".heads.1." in n)
    shared = [n for n in spans if ".task" not in n and ".heads." not in n]
    assert shared and all(spans[n] == (0, 3) for n in shared)  # the shared weights: the first task only
    # the schedule: each group's learning rate is 0 outside its steps
    opt = build_optimizer(model, cfg)
    f = lr_lambdas(cfg, opt)
    for g, lam in zip(opt.param_groups, f):
        start, end = g["lr_steps"]
        assert all((lam(s) > 0) == (start <= s < end) for s in range(9)), (start, end)

    # task 1's module changes task 1's outputs only
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B.task1" in n:
                p.normal_(0, 0.5)
    batch = _batch()
    model.eval()
    outs = {}
    with torch.no_grad():
        for task in ("a", "b"):
            select_task(model, task)
            outs[task] = model(**batch).terms["classification"]["logits"]
    assert (outs["a"][:, 2:] < -1e30).all()  # a's classes only
    assert (outs["b"][:, :2] < -1e30).all()
    _, plain = _model()
    with torch.no_grad():
        select_task(plain.eval(), "a")
        torch.testing.assert_close(plain(**batch).terms["classification"]["logits"], outs["a"], rtol=0, atol=0)


def test_a_finished_task_is_left_exactly_as_it_was():
    """Steps of task b (AdamW, the engine's groups and schedule) change task b's module and nothing else: task a's
    adapter and head and the shared weights stay bit-identical, though they had Adam state from task a."""
    from mmscale.callbacks.task_adapters import select_task
    from mmscale.training.engine import build_optimizer, lr_lambdas

    cfg, model = _model()
    opt = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(cfg, opt))
    model.train()

    def step(task: str) -> None:
        select_task(model, task)
        out = model(**_batch(sched.last_epoch))
        out.terms["classification"]["loss_sum"].backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        sched.step()

    for _ in range(3):
        step("a")
    after_a = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(4):
        step("b")
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, after_a[n])}
    assert moved and all(".task1." in n or ".heads.1." in n for n in moved), sorted(moved)[:5]
    assert any(".heads.1." in n for n in moved) and any("lora_B.task1" in n for n in moved)


@pytest.mark.slow
def test_task_adapters_two_ranks_forget_nothing_and_resume_mid_task(tiny_data, tmp_path):  # noqa: F811
    """{0, 1} then {2, 3} on real digits, 2 ranks, ZeRO-3: task a's accuracy through its module is exactly the same
    after task b; the parameter growth and the expert gate's figures are logged; a run stopped in the middle of task
    b and resumed ends with the uninterrupted run's matrix; evaluate's --task is required and checked."""
    tokenizer = next(a for a in tiny_data if a.startswith("data.tokenizer="))
    common = [tokenizer, *two_digit_tasks(tmp_path, 20, train_per_shard=40), "train.lr=3e-3", "train.warmup_steps=1",
              "train.checkpoint_every=5", "train.global_batch_size=16", "train.micro_batch_size=8",
              "train.eval_batches=2", "data.num_workers=0", "deepspeed.stage3_param_persistence_threshold=0",
              "callbacks=[{name: task_adapters, args: {r: 4}}]"]
    launch(RUN_TINY, [str(tmp_path / "full.json"), f"output_dir={tmp_path / 'full'}", *common], nprocs=2)
    launch(RUN_TINY, [str(tmp_path / "a.json"), f"output_dir={tmp_path / 'cut'}", "--stop-at", "32", *common],
           nprocs=2)
    launch(RUN_TINY, [str(tmp_path / "b.json"), f"output_dir={tmp_path / 'cut'}", "--resume", *common], nprocs=2)
    full = json.loads((tmp_path / "full/continual.json").read_text())
    cut = json.loads((tmp_path / "cut/continual.json").read_text())
    R = full["matrix"]
    assert R[1][0] == R[0][0] and R[0][0] > 0.6, R  # task a through its own module: not a sample changes
    assert full["average_forgetting"] == 0.0
    assert [v for row in cut["matrix"] for v in row] == pytest.approx([v for row in R for v in row], abs=1e-9)
    records = [json.loads(x) for x in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    gate = [r for r in records if "gate_task_accuracy" in r]
    assert len(gate) == 2 and gate[0]["gate_task_accuracy"] == 1.0  # one module: always the right task
    assert 0 <= gate[1]["gate_accuracy"] <= 1 and 0 <= gate[1]["gate_task_accuracy"] <= 1
    assert [r["params_per_task"] for r in records if "params_per_task" in r][0] > 0

    # the export of one task: its adapter merged, its heads the model's, a plain model that classifies as the run's
    # model does through that task's module
    from mmscale.callbacks.task_adapters import select_task
    from mmscale.data import EvalLoader
    from mmscale.export import load_exported
    from mmscale.export import main as export_main
    from mmscale.job.runs import load_run

    assert export_main(["model", "--run", str(tmp_path / "full"), "--out", str(tmp_path / "exp-x")]) == 2  # which task?
    assert export_main(["model", "--run", str(tmp_path / "full"), "--out", str(tmp_path / "exp-b"), "--task", "b"]) == 0
    exported, tok, exported_cfg = load_exported(tmp_path / "exp-b")
    info = json.loads((tmp_path / "exp-b/config.json").read_text())
    assert info["adapters"]["task"] == "b" and info["adapters"]["lora_merged"] > 0
    assert not exported_cfg.callbacks and not any("lora_" in n for n, _ in exported.named_parameters())
    cfg, run_model, _ = load_run(tmp_path / "full")
    select_task(run_model.eval(), "b")
    batch = next(iter(EvalLoader(cfg.data, tok, 8, 0, 1, shards=str(tmp_path / "b/val"), max_batches=1)))
    inputs = {k: batch[k] for k in ("pixel_values", "image_mask", "input_ids", "attention_mask", "media_index")}
    with torch.no_grad():
        want = run_model(**inputs).terms["classification"]["logits"]
        got = exported.eval()(**inputs).terms["classification"]["logits"]
    active = want > -1e30  # (inactive classes: the lowest float)
    assert torch.equal(active, got > -1e30) and active[:, 2:].all() and not active[:, :2].any()  # b's classes
    assert (got[active] - want[active]).abs().max() <= 1e-4

    # every task's adapter apart: peft's format for the LM, the rest beside it; each loads back as its task's model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mmscale.training import weights

    assert export_main(["model", "--run", str(tmp_path / "full"), "--out", str(tmp_path / "exp-sep"),
                        "--adapters", "separate"]) == 0
    with pytest.raises(ValueError, match="holds one adapter per task"):
        load_exported(tmp_path / "exp-sep")
    for name in ("a", "b"):
        model_t, _, _ = load_exported(tmp_path / "exp-sep", task=name)
        select_task(run_model, name)
        with torch.no_grad():
            want = run_model(**inputs).terms["classification"]["logits"]
            got = model_t.eval()(**inputs).terms["classification"]["logits"]
        active = want > -1e30
        assert torch.equal(active, got > -1e30) and (got[active] - want[active]).abs().max() <= 1e-4, name
    plain_cfg = load_config(TINY, ["data.synthetic_train_samples=8", f"model.init_from={tmp_path / 'exp-sep'}"],
                            check_paths=False)
    weights.export_base_lm(plain_cfg, info["vocab_size"], tmp_path / "plain_lm")
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "plain_lm"),
                              tmp_path / "exp-sep/adapter/b")  # peft itself loads a task's LM adapter

    # model.init_from the run: a new model gets every shared weight (its heads are per task: not a base weight)
    import dataclasses

    from mmscale.training.weights import load_initial_weights

    fresh = model_recipe(dataclasses.replace(cfg, callbacks=[])).build(tok.vocab_size)
    report = load_initial_weights(fresh, str(tmp_path / "full"), 0)
    assert sorted(report["missing"]) == ["objectives.classification.head.bias",
                                         "objectives.classification.head.weight"], report["missing"]

    from mmscale.evaluation.evaluate import main as evaluate_main

    assert evaluate_main(["--checkpoint", str(tmp_path / "full"), "--shards", str(tmp_path / "a/val"),
                          "--batches", "1"]) == 2  # no --task: refused, naming the tasks
    assert evaluate_main(["--checkpoint", str(tmp_path / "full"), "--shards", str(tmp_path / "a/val"),
                          "--batches", "1", "--task", "c"]) == 2
    assert evaluate_main(["--checkpoint", str(tmp_path / "full"), "--shards", str(tmp_path / "a/val"),
                          "--batches", "2", "--task", "a", "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval/report.json").read_text())
    assert report["task"] == "a" and set(report["models"]["model"]["cls_accuracy_per_class"]) <= {"0", "1"}


def test_init_from_reads_a_base_weight_under_peft_s_name():
    """A run whose checkpoint holds peft's layers in place (task_adapters saves every weight) gives a new run its
    base weights: `q_proj.base_layer.weight` is the built model's `q_proj.weight`; the adapters match nothing."""
    from mmscale.training.weights import base_names

    names = ["lm.a.q_proj.base_layer.weight", "lm.a.q_proj.lora_A.task0.weight", "lm.a.norm.weight"]
    assert base_names(names) == {"lm.a.q_proj.weight": "lm.a.q_proj.base_layer.weight",
                                 "lm.a.q_proj.lora_A.task0.weight": "lm.a.q_proj.lora_A.task0.weight",
                                 "lm.a.norm.weight": "lm.a.norm.weight"}
