"""Exporting a run as one Hugging Face-style folder (`launchers/export.py`, `mmscale.export`): the streaming
safetensors writer and its shards, memory, refusals; then, on real 2-rank DeepSpeed runs (slow), a ZeRO-3 run and a
LoRA run (ZeRO-2) exported and reloaded in a fresh process without DeepSpeed against the engines' own evaluation,
and a new run started from an export (`model.init_from`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmscale.export import main as export_main
from mmscale.export import shards
from mmscale.export.config import export_config
from mmscale.export.merge import plain_linears
from mmscale.job.build import build_as_trained
from mmscale.training.readers import SAFETENSORS_INDEX, CheckpointReader, SafetensorsReader
from test_finetune import source_run  # noqa: F401  (a fixture: a 2-rank ZeRO-3 run that validates at its end)
from test_training import ROOT, launch, tiny_data  # noqa: F401  (tiny_data is a fixture)

EXPORT = ROOT / "launchers/export.py"
INPUTS = ("pixel_values", "image_mask", "input_ids", "attention_mask", "media_index", "labels")

# A fresh interpreter: load_exported, then the validation loss over every validation sample and the logits of the
# first batch. It fails if loading pulled in DeepSpeed (or peft, unless allowed) or started a process group.
RELOAD = r"""
import json, sys
import torch
from safetensors.torch import save_file
from mmscale.export import load_exported
from mmscale.data import EvalLoader

directory, out, allow_peft, adapters = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
model, tok, cfg = load_exported(directory, adapters=adapters)
assert "deepspeed" not in sys.modules, "load_exported imported deepspeed"
assert allow_peft or "peft" not in sys.modules, "load_exported imported peft"
assert not torch.distributed.is_initialized()
loss, tokens, logits = 0.0, 0, None
with torch.no_grad():
    for batch in EvalLoader(cfg.data, tok, 4, 0, 1, shards=cfg.data.val_shards, max_batches=16):
        o = model(**{k: batch[k] for k in %r})
        loss, tokens = loss + float(o.terms["captioning"]["loss_sum"]), tokens + int(o.terms["captioning"]["count"])
        if logits is None:
            logits = o.logits.float().contiguous()
save_file({"logits": logits}, out + ".safetensors")
json.dump({"val_loss": loss / tokens, "val_tokens": tokens, "dtype": str(next(model.parameters()).dtype)},
          open(out + ".json", "w"))
""" % (INPUTS,)


def reload(directory: Path, out: Path, allow_peft: bool = False, adapters: bool = True) -> tuple[dict, torch.Tensor]:
    """load_exported in a new Python process: (its val loss record, the first batch's logits)."""
    from safetensors.torch import load_file

    r = subprocess.run([sys.executable, "-c", RELOAD, str(directory), str(out), "1" if allow_peft else "0",
                        "1" if adapters else "0"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(Path(str(out) + ".json").read_text()), load_file(str(out) + ".safetensors")["logits"]


def run_export(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(EXPORT), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


def manifest_of(run: Path) -> dict:
    from mmscale.training.checkpoint import latest_checkpoint, read_manifest

    return read_manifest(latest_checkpoint(run / "checkpoints"))


# ----------------------------------------------------------------------------------------------- no DeepSpeed


def test_sizes_and_dtypes_parse():
    assert shards.parse_size("2GB") == 2 * 10**9 and shards.parse_size("512MiB") == 512 * 2**20
    assert shards.parse_size("100kb") == 100_000 and shards.parse_size("4096") == 4096 and shards.parse_size(7) == 7
    for bad in ("", "2 parsecs", "-1GB", "0"):
        with pytest.raises(ValueError, match="max-shard-size"):
            shards.parse_size(bad)
    assert shards.as_dtype("bf16") == torch.bfloat16 and shards.as_dtype("float32") == torch.float32
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        shards.as_dtype("int4")


def test_streamed_shards_follow_the_hugging_face_convention(tmp_path):
    """The writer's files read back with safetensors itself, bit for bit, in every dtype; above the shard size
    several `model-0000i-of-0000N.safetensors` and an index with total_size and weight_map; mmscale's init_from
    reader (weights.read_weights) and the export reader read the sharded folder alike."""
    from safetensors.torch import load_file

    from mmscale.training import weights

    g = torch.Generator().manual_seed(0)
    tensors = {f"layer.{i}.weight": torch.randn(64, 32, generator=g) for i in range(6)}
    tensors.update({"mask": torch.tensor([True, False, True]), "ids": torch.arange(5), "scalar": torch.tensor(2.5)})
    items = [(n, tuple(t.shape), torch.bfloat16 if t.is_floating_point() else t.dtype) for n, t in tensors.items()]
    asked = []

    def read(name):
        asked.append(name)
        return tensors[name]

    (tmp_path / "one").mkdir()
    one = shards.write_weights(tmp_path / "one", items, read, 10**9)
    assert one == {"files": ["model.safetensors"], "total_size": 6 * 64 * 32 * 2 + 3 + 5 * 8 + 2, "index": None}
    assert asked == list(tensors)  # each tensor asked for once, in order
    back = load_file(tmp_path / "one/model.safetensors")
    for n, t in tensors.items():
        want = t.to(torch.bfloat16) if t.is_floating_point() else t
        assert back[n].dtype == want.dtype and torch.equal(back[n], want), n

    (tmp_path / "many").mkdir()
    many = shards.write_weights(tmp_path / "many", items, read, 64 * 32 * 2 * 2)  # two weights a shard
    assert many["files"] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / "many" / SAFETENSORS_INDEX).read_text())
    assert index["metadata"] == {"total_size": one["total_size"]}
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(many["files"])
    state, _ = weights.read_weights(str(tmp_path / "many"))
    reader = SafetensorsReader(tmp_path / "many")
    for n in tensors:
        assert torch.equal(state[n], back[n]) and torch.equal(reader.read(n), back[n])
        assert reader.shape(n) == tuple(tensors[n].shape) and reader.dtype(n) == back[n].dtype


STREAM = r"""
import json, sys
from pathlib import Path
import torch
from mmscale.export import shards

out, n, numel = sys.argv[1], 24, 4 << 20  # 24 tensors of 16 MiB: 384 MiB of fp32 weights
items = [(f"w{i}", (numel,), torch.float32) for i in range(n)]
shards.reset_peak_memory()
start = shards.memory_status()["rss"]
written = shards.write_weights(Path(out), items, lambda name: torch.full((numel,), float(name[1:])), 200 << 20)
print(json.dumps({"over_start": shards.memory_status()["peak"] - start, "total": written["total_size"],
                  "files": written["files"]}))
"""


def test_the_writer_holds_one_tensor_at_a_time(tmp_path):
    """384 MiB of weights written in 16 MiB tensors (two shards): the peak resident memory of the writing process
    grows by about one tensor, not by the model (measured in a fresh process, peak counter reset first)."""
    r = subprocess.run([sys.executable, "-c", STREAM, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["total"] == 24 * (16 << 20) and len(got["files"]) == 2
    assert got["over_start"] < 3 * (16 << 20), got  # a tensor and its bytes in flight, far from 384 MiB


def _fake_run(tmp_path: Path, tiny_data: list[str], callbacks: str = "[]") -> Path:  # noqa: F811
    """A run directory as training leaves it before its first save: config.yaml, no checkpoint."""
    from mmscale.job.preflight import load_config

    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(ROOT / "configs/tiny.yaml", [*tiny_data, f"output_dir={run}", f"callbacks={callbacks}"])
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "checkpoints").mkdir()
    return run


def test_bad_inputs_are_refused_with_the_fix(tiny_data, tmp_path, capsys):  # noqa: F811
    """No checkpoint, not a run, an --out that holds something, --adapters separate without adapters: exit 2, a
    message naming the fix, nothing written."""
    run = _fake_run(tmp_path, tiny_data)
    out = tmp_path / "out"

    def refused(*args: str) -> str:
        assert export_main(["model", *args]) == 2
        return capsys.readouterr().err

    err = refused("--run", str(run), "--out", str(out))
    assert "holds no complete checkpoint" in err and "--checkpoint" in err and "train.checkpoint_every" in err
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))
    err = refused("--run", str(tmp_path / "nope"), "--out", str(out))
    assert "is not a directory; give the output_dir of a training run" in err
    (tmp_path / "empty").mkdir()
    assert "holds no config.yaml: not the output_dir of a training run" in refused("--run", str(tmp_path / "empty"),
                                                                                  "--out", str(out))
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = refused("--run", str(run), "--out", str(out))
    assert "exists and is not empty; choose another --out, or pass --overwrite" in err
    err = refused("--run", str(run), "--out", str(out), "--overwrite")  # only an earlier export is replaced
    assert "not an mmscale export" in err and (out / "notes.txt").read_text() == "mine"
    assert "would hold the run" in refused("--run", str(run), "--out", str(tmp_path))
    err = refused("--run", str(run), "--out", str(tmp_path / "o2"), "--adapters", "separate")
    assert "hold no lora or qlora; leave --adapters out" in err
    err = refused("--run", str(run), "--out", str(out / "x"), "--checkpoint", "step_00000009")
    assert "--checkpoint 'step_00000009' is not a directory" in err
    assert f"a name under {run / 'checkpoints'} or a path; or leave --checkpoint out" in err
    assert "max-shard-size" in refused("--run", str(run), "--out", str(tmp_path / "o3"), "--max-shard-size", "lots")


def test_qlora_merge_dequantizes_then_adds_the_adapters(tmp_path):
    """A QLoRA model (4-bit NF4 LM from model.lm.path, LoRA on its attention) made plain in one process: each
    adapted layer becomes W = dequantize(W4) + B A * alpha / r in fp32, every other 4-bit layer its dequantized
    weight, and the names are those of the model its exported config builds (no 4-bit, no lora left)."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    from mmscale.job.preflight import load_config
    from mmscale.model.multimodal import build_lm

    torch.manual_seed(0)
    cfg0 = load_config(ROOT / "configs/tiny.yaml", check_paths=False)
    build_lm(cfg0.model, vocab_size=64).save_pretrained(tmp_path / "base")
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"model.lm.path={tmp_path / 'base'}", "train.precision=bf16",
                                                   "callbacks=[{name: qlora}]"], check_paths=False)
    model = build_as_trained(cfg, 64)
    expected = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            torch.nn.init.normal_(m.lora_B["default"].weight)  # as if trained (it starts at zero)
            base = m.get_base_layer()
            w4 = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
            delta = m.lora_B["default"].weight.float() @ m.lora_A["default"].weight.float() * m.scaling["default"]
            expected[name + ".weight"] = w4 + delta
        elif isinstance(m, bnb.nn.Linear4bit) and not name.endswith("base_layer"):
            expected[name + ".weight"] = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
    counts = plain_linears(model, merge=True)
    assert counts == {"lora_merged": 8, "lora_removed": 0, "dequantized": 14}  # 2 layers x (4 attn + 3 mlp)
    state = model.state_dict()
    for name, w in expected.items():
        assert torch.equal(state[name], w), name
    assert not any(isinstance(m, (bnb.nn.Linear4bit, LoraLayer)) for m in model.modules())
    cfg_out, changes = export_config(cfg, "tokenizer.model", 64)
    assert [c.name for c in cfg_out.callbacks] == [] and not cfg_out.model.lm.path
    assert any("model.lm.path" in c for c in changes) and any("qlora taken out" in c for c in changes)
    plain = build_as_trained(cfg_out, 64, meta=True).state_dict()
    assert {n: tuple(t.shape) for n, t in plain.items()} == {n: tuple(t.shape) for n, t in state.items()}


# ----------------------------------------------------------------------------------------------- 2-rank runs (slow)


def tiny_model_blocks() -> list:
    from mmscale.job.build import model_recipe
    from mmscale.job.preflight import load_config

    return model_recipe(load_config(ROOT / "configs/tiny.yaml", check_paths=False)).build(64, meta=True).xattn_blocks()


def tiny_resampler_depth() -> int:
    from mmscale.job.preflight import load_config

    return load_config(ROOT / "configs/tiny.yaml", check_paths=False).model.resampler.depth


@pytest.fixture(scope="module")
def lora_run(source_run):
    """LoRA on the LM, the cross-attention and the resampler (model.train_xattn / train_resampler = lora) from the
    base run's weights, 2 ranks under ZeRO-2 (another stage's files); its checkpoints hold only what trains (the
    adapters and the cross-attention's gates)."""
    tmp, data = source_run
    out = tmp / "lora"
    launch(ROOT / "launchers/train.py", ["--config", "configs/tiny.yaml", f"output_dir={out}", *data,
                                         f"model.init_from={tmp / 'src'}", "callbacks=[{name: lora}]",
                                         "model.train_xattn=lora", "model.train_resampler=lora",
                                         "deepspeed.zero_stage=2", "train.max_steps=4", "train.lr=1e-2",
                                         "train.warmup_steps=1"], nprocs=2)
    return out


@pytest.mark.slow
def test_zero3_export_reloads_without_deepspeed(source_run, tmp_path):
    """The 2-rank ZeRO-3 run exported (one file, then forced into shards): a fresh process without DeepSpeed
    evaluates it to the loss the engine recorded at the save, and its logits equal those of the checkpoint rebuilt by
    build_from_checkpoint; every tensor is bit-identical to DeepSpeed's own consolidation; both layouts load
    identically; an existing export is replaced only with --overwrite."""
    from safetensors.torch import load_file

    from mmscale.data import EvalLoader
    from mmscale.job.runs import load_run
    from mmscale.training.checkpoint import consolidated_state_dict, latest_checkpoint

    tmp, _ = source_run
    run, out, shards = tmp / "src", tmp_path / "export", tmp_path / "sharded"
    engine = manifest_of(run)["metrics"]
    r = run_export("--run", str(run), "--out", str(out))
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["files"] == ["model.safetensors"] and summary["step"] == 3
    assert {"config.yaml", "config.json", "model.safetensors", "tokenizer.model", "README.md"} <= \
        {p.name for p in out.iterdir()}
    info = json.loads((out / "config.json").read_text())
    assert info["format"] == "mmscale-export" and info["dtype"] == "float32" and info["vocab_size"] > 0
    assert info["trained_by"]["step"] == 3 and info["trained_by"]["zero_stage"] == 3
    assert info["trained_by"]["world_size"] == 2 and info["trained_by"]["metrics"]["val_loss"] == engine["val_loss"]
    readme = (out / "README.md").read_text()
    assert "step 3" in readme and "val_loss" in readme and "load_exported" in readme and "ZeRO stage 3" in readme

    saved = load_file(out / "model.safetensors")
    reference = consolidated_state_dict(latest_checkpoint(run / "checkpoints"))
    assert set(saved) == set(reference) and all(torch.equal(saved[k], reference[k]) for k in saved)

    got, logits = reload(out, tmp_path / "single")
    assert got["val_tokens"] == engine["val_tokens"]
    assert got["val_loss"] == pytest.approx(engine["val_loss"], rel=1e-6), (got, engine)
    cfg, model, tok = load_run(run)  # the checkpoint rebuilt in this process (build_from_checkpoint)
    batch = next(iter(EvalLoader(cfg.data, tok, 4, 0, 1, shards=cfg.data.val_shards, max_batches=16)))
    with torch.no_grad():
        want = model(**{k: batch[k] for k in INPUTS}).logits
    assert (logits - want).abs().max() <= 1e-4

    run_export("--run", str(run), "--out", str(shards), "--max-shard-size", "200KB")
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in
                                         range(1, len(files) + 1)]
    assert not (shards / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in saved.values())
    got_sharded, logits_sharded = reload(shards, tmp_path / "sharded")
    assert got_sharded == got and torch.equal(logits_sharded, logits)

    r = run_export("--run", str(run), "--out", str(shards), check=False)
    assert r.returncode == 2 and "pass --overwrite" in r.stderr
    run_export("--run", str(run), "--out", str(shards), "--overwrite")
    assert (shards / "model.safetensors").is_file() and not (shards / "model.safetensors.index.json").exists()


@pytest.fixture(scope="module")
def lora_exports(lora_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_exports")
    run_export("--run", str(lora_run), "--out", str(tmp / "merged"))
    run_export("--run", str(lora_run), "--out", str(tmp / "separate"), "--adapters", "separate")
    return tmp / "merged", tmp / "separate"


@pytest.mark.slow
def test_lora_run_exports_merged_and_separate(lora_run, lora_exports, tmp_path):
    """The LoRA run (ZeRO-2): the merged export is a plain model (no peft to load it) that evaluates to the engine's
    loss and gives the logits of the run's own model, base plus unmerged adapters (the separate export, which peft
    applies); the separate export's adapters are peft's format (PeftModel loads them onto the plain LM taken out of
    the export), as the `adapter` subcommand writes them; the streamed checkpoint equals DeepSpeed's consolidation
    of it."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from mmscale.job.preflight import load_config
    from mmscale.training import checkpoint, weights

    merged, separate = lora_exports
    engine = manifest_of(lora_run)["metrics"]
    info = json.loads((merged / "config.json").read_text())
    # 8 on the LM (q, k, v, o x 2 layers), 5 in each cross-attention block and each resampler layer
    others = 5 * (len(tiny_model_blocks()) + tiny_resampler_depth())
    assert info["adapters"]["mode"] == "merged" and info["adapters"]["lora_merged"] == 8 + others
    separate_info = json.loads((separate / "config.json").read_text())["adapters"]
    assert (separate_info["lora_merged"], separate_info["lora_removed"]) == (others, 8)  # only the LM's set aside
    assert "lora_" not in " ".join(load_file(merged / "model.safetensors"))
    got, logits = reload(merged, tmp_path / "merged")  # fails if peft is imported
    assert got["val_loss"] == pytest.approx(engine["val_loss"], rel=1e-5), (got, engine)

    own, own_logits = reload(separate, tmp_path / "separate", allow_peft=True)  # base + adapters, as trained
    assert own["val_loss"] == pytest.approx(engine["val_loss"], rel=1e-6), (own, engine)
    assert (logits - own_logits).abs().max() <= 1e-4
    base_only, _ = reload(separate, tmp_path / "base_only", adapters=False)
    assert abs(base_only["val_loss"] - own["val_loss"]) > 1e-3  # the adapters matter

    adapter = separate / "adapter"
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    cfg = load_config(ROOT / "configs/tiny.yaml", ["data.synthetic_train_samples=8", f"model.init_from={separate}"],
                      check_paths=False)
    weights.export_base_lm(cfg, info["vocab_size"], tmp_path / "plain_lm")  # the export as a source
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "plain_lm"), adapter)
    loaded, saved = get_peft_model_state_dict(peft_model), load_file(adapter / "adapter_model.safetensors")
    assert set(loaded) == set(saved) and len(saved) == 16 and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert any("lora_B" in k and saved[k].abs().sum() > 0 for k in saved)
    assert export_main(["adapter", "--run", str(lora_run), "--out", str(tmp_path / "adapter_only")]) == 0
    alone = load_file(tmp_path / "adapter_only/adapter_model.safetensors")  # the `adapter` subcommand, the same
    assert set(alone) == set(saved) and all(torch.equal(alone[k], saved[k]) for k in saved)

    # the stage-2 reader against DeepSpeed's consolidation (its optimizer files also hold ZeRO-1/2's slice records,
    # which mmscale's safe loader accepts)
    ckpt = checkpoint.latest_checkpoint(lora_run / "checkpoints")
    reference = checkpoint.consolidated_state_dict(ckpt)
    reader = CheckpointReader(ckpt)
    assert reader.stage == 2 and set(reader.names) == set(reference)
    assert all(torch.equal(reader.read(n), reference[n]) for n in reference)


@pytest.mark.slow
def test_init_from_an_export_starts_from_its_weights(source_run, lora_exports, tmp_path):
    """A new run (one process, ZeRO-0) with model.init_from=<the merged LoRA export> evaluates, before its first
    step, to the exported model's loss; exported in turn (a ZeRO-0 checkpoint), it reloads to its own final loss."""
    _, data = source_run
    merged, _ = lora_exports
    exported, _ = reload(merged, tmp_path / "exported")
    out = tmp_path / "run"
    r = launch(ROOT / "launchers/train.py", ["--config", "configs/tiny.yaml", f"output_dir={out}", *data,
                                             f"model.init_from={merged}", "train.eval_at_start=true",
                                             "train.max_steps=1", "deepspeed.zero_stage=0"], nprocs=1)
    assert "tensors loaded" in r.stderr and "missing" not in r.stderr.split("tensors loaded")[1].split("\n")[0]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = {x["step"]: x["val_loss"] for x in lines if "val_loss" in x}
    assert val[0] == pytest.approx(exported["val_loss"], rel=1e-6), (val, exported)

    run_export("--run", str(out), "--out", str(tmp_path / "again"))
    again, _ = reload(tmp_path / "again", tmp_path / "again")
    assert again["val_loss"] == pytest.approx(val[1], rel=1e-6) and again["val_loss"] != val[0]
