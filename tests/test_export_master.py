"""Export and `model.init_from` of a bf16 run read the fp32 master weights (issue 18, finding 15).

At ZeRO-0 and ZeRO-1 a bf16 run's `*model_states.pt` holds the module's bf16 weights; the fp32 master copy the
optimizer steps lives in the optimizer's state (ZeRO-0: `fp32_groups` in the model states' `optimizer`; ZeRO-1:
`single_partition_of_fp32_groups` in each rank's `*optim_states.pt`, the group's flat vector cut over the ranks).
A few steps at a learning rate of 1e-2 move the masters by more than bf16 resolves, so the two differ.

The reference here reads the masters straight from those files: ZeRO-1 names them (`param_shapes`); ZeRO-0 does
not, and the same config's ZeRO-1 run gives the names (both take their groups from `engine.build_optimizer`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from test_run_loading import train
from test_training import ROOT, launch

BF16_FAST = ["train.precision=bf16", "train.lr=1e-2", "train.warmup_steps=0"]
STEP_4 = "step_00000004"


def _load(path: Path) -> dict:
    from mmscale.training.zero_checkpoint import safe_load

    return safe_load(path)


def _rank(path: Path) -> int:
    return int(re.search(r"_rank_(\d+)_", path.name).group(1))


def group_names(ckpt: Path) -> list[list[str]]:
    """The trained weights' names, group by group in the optimizer's flat order (a ZeRO-1 checkpoint's
    `param_shapes`)."""
    (model_states,) = ckpt.glob("*model_states.pt")
    return [list(g) for g in _load(model_states)["param_shapes"]]


def masters(ckpt: Path, names: list[list[str]] | None = None) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a ZeRO-0 or ZeRO-1 bf16 checkpoint, read straight from the optimizer state."""
    (model_states,) = ckpt.glob("*model_states.pt")
    meta = _load(model_states)
    module = meta["module"]
    out = {}
    if meta["ds_config"]["zero_optimization"]["stage"] == 0:
        groups = meta["optimizer"]["fp32_groups"]
        assert [len(g) for g in groups] == [len(g) for g in names]
        for group, in_group in zip(groups, names):
            for t, name in zip(group, in_group):
                assert t.dtype == torch.float32 and t.shape == module[name].shape, name
                out[name] = t
        return out
    optims = [_load(f)["optimizer_state_dict"] for f in sorted(ckpt.glob("*optim_states.pt"), key=_rank)]
    for g, shapes in enumerate(meta["param_shapes"]):
        flat = torch.cat([o["single_partition_of_fp32_groups"][g] for o in optims])
        paddings = optims[0].get("param_alignment_paddings")
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            n = shape.numel()
            out[name] = flat[offset:offset + n].view(shape)
            offset += n + (paddings[g][i] if paddings else 0)
    return out


def module_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    (model_states,) = ckpt.glob("*model_states.pt")
    return _load(model_states)["module"]


def check_is_master(state: dict[str, torch.Tensor], master: dict[str, torch.Tensor],
                    module: dict[str, torch.Tensor], what: str) -> None:
    """`state` holds the fp32 masters of the trained weights (not their bf16 rounding) and the module's weights of
    the rest, widened to fp32."""
    assert module and all(t.dtype == torch.bfloat16 for t in module.values() if t.is_floating_point())
    wrong = [n for n in master if n in state and not torch.equal(state[n].float(), master[n])]
    assert not wrong, f"{what}: not the fp32 master weights: {wrong[:5]}"
    assert all(n in state for n in master), f"{what}: missing {[n for n in master if n not in state][:5]}"
    rounded = [n for n in master if not torch.equal(master[n], module[n].float())]
    assert len(rounded) >= len(master) // 2, f"{what}: the masters hardly differ from bf16 ({len(rounded)})"
    frozen = [n for n in module if n not in master and n in state]
    assert frozen, "the tiny preset freezes its vision tower and LM"
    bad = [n for n in frozen if not torch.equal(state[n].float(), module[n].float())]
    assert not bad, f"{what}: frozen weights differ from the module's: {bad[:5]}"


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory) -> dict[int, Path]:
    """Two tiny one-process bf16 runs, ZeRO-0 and ZeRO-1, 4 steps at lr 1e-2 (checkpoints at steps 2 and 4)."""
    root = tmp_path_factory.mktemp("export_master")
    runs = {}
    for stage in (0, 1):
        out = root / f"zero{stage}"
        r = train(out, *BF16_FAST, f"deepspeed.zero_stage={stage}")
        assert r.returncode == 0, r.stderr[-3000:]
        runs[stage] = out
    return runs


def _expected_masters(runs: dict[int, Path], stage: int) -> tuple[Path, dict[str, torch.Tensor]]:
    ckpt = runs[stage] / "checkpoints" / STEP_4
    names = group_names(runs[1] / "checkpoints" / STEP_4) if stage == 0 else None
    return ckpt, masters(ckpt, names)


@pytest.mark.parametrize("stage", [0, 1])
def test_export_writes_the_fp32_masters(bf16_runs, stage, tmp_path):
    from safetensors.torch import load_file

    from mmscale.export import export_model

    ckpt, master = _expected_masters(bf16_runs, stage)
    export_model(bf16_runs[stage], tmp_path / "export", dtype="fp32")
    exported = load_file(tmp_path / "export" / "model.safetensors")
    check_is_master(exported, master, module_weights(ckpt), f"export of the ZeRO-{stage} bf16 run")


@pytest.mark.parametrize("stage", [0, 1])
def test_init_from_starts_from_the_fp32_masters(bf16_runs, stage):
    from mmscale.training.readers import open_source
    from mmscale.training import checkpoint, weights

    ckpt, master = _expected_masters(bf16_runs, stage)
    module = module_weights(ckpt)
    state, where = weights.read_weights(str(bf16_runs[stage]))  # what engine.load_initial_weights loads
    assert where == ckpt
    check_is_master(state, master, module, f"init_from the ZeRO-{stage} bf16 run")
    check_is_master(checkpoint.consolidated_state_dict(ckpt), master, module, "consolidated_state_dict")
    reader = open_source(bf16_runs[stage])  # the streamed init_from of export and inference
    check_is_master({n: reader.read(n) for n in reader.names}, master, module, f"streamed init_from, ZeRO-{stage}")


@pytest.mark.slow
def test_two_rank_zero1_export_and_init_from_read_every_partition(tmp_path):
    """Two ranks: each `*optim_states.pt` holds half of every group's flat fp32 vector."""
    from safetensors.torch import load_file

    from mmscale.export import export_model
    from mmscale.training import weights

    run = tmp_path / "run"
    launch(ROOT / "launchers/train.py",
           ["--config", str(ROOT / "configs/tiny.yaml"), f"output_dir={run}", "train.max_steps=4",
            "train.checkpoint_every=4", "deepspeed.zero_stage=1", *BF16_FAST], nprocs=2)
    ckpt = run / "checkpoints" / STEP_4
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2
    master = masters(ckpt)
    module = module_weights(ckpt)
    export_model(run, tmp_path / "export", dtype="fp32")
    check_is_master(load_file(tmp_path / "export" / "model.safetensors"), master, module, "two-rank export")
    state, _ = weights.read_weights(str(run))
    check_is_master(state, master, module, "two-rank init_from")


def test_zero0_masters_are_named_only_where_certain(caplog):
    """ZeRO-0 records no names for its masters: each is named by where it fits the module in order; a bf16-identical
    twin of the same shape leaves it ambiguous (module value kept, with a warning); tied names share one master."""
    from mmscale.training.zero_checkpoint import master_index

    tied = torch.tensor([[0.5, 1.5], [-0.75, 1.0], [2.0, -3.0]]).bfloat16()  # |x| >= 0.5: +1e-4 rounds back
    module = {"frozen.norm": torch.ones(4).bfloat16(), "norm": torch.ones(4).bfloat16(),
              "w": torch.tensor([[0.5, -1.25], [2.0, 0.75]]).bfloat16(), "emb": tied, "head": tied}
    masters = [[module["w"].float() + 1e-4, module["emb"].float() + 1e-5], [torch.ones(4) + 1e-4]]
    meta = {"ds_config": {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, "module": module,
            "optimizer": {"fp32_groups": masters}}
    with caplog.at_level("WARNING"):
        where = master_index(meta, [])
    assert where == {"w": ("tensor", 0, 0), "emb": ("tensor", 0, 1), "head": ("tensor", 0, 1)}
    assert "frozen.norm or norm" in caplog.text
