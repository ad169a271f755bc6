"""The README's feature marks, each proven by a real 2-rank run: ZeRO stages 0-3, CPU offload, bf16/fp32,
activation checkpointing under DeepSpeed, `model.lm.path` under `zero.Init`, early stopping.

One launch of tests/dist/run_matrix.py (about 15-20 s of it is the launcher's and DeepSpeed's start-up) runs every
variant one after another in one process group, from the same initial weights and on the same batches; each test
below reads its variant's record. See run_matrix.py for what each variant does and records.
"""

from __future__ import annotations

import json

import pytest

from test_training import ROOT, launch, tiny_data  # noqa: F401  (tiny_data is a fixture)

RUN_MATRIX = ROOT / "tests/dist/run_matrix.py"

# fp32 variants against the fp32 ZeRO-3 reference, step by step. Measured (2 ranks, 4 steps): bit-identical, max
# relative difference 0.0 for every stage and offload and for activation checkpointing. With 2 ranks every
# reduction is a sum of two terms (the same whichever collective does it), and the recompute repeats the very
# same ops; what may reorder is the grad-norm sum over partitions, ~1e-7 relative in fp32, which 4 Adam steps at
# lr 1e-3 amplify little. Bound: 1e-5.
FP32_REL = 1e-5
# bf16 against fp32: bf16 rounds each weight and activation to 8 significant bits (relative 2^-8 = 3.9e-3 each),
# and the loss averages ~70 tokens' cross-entropy computed in fp32. Measured: max relative difference 1.0e-4 over
# the 4 steps. Bound: 1e-2, 100x the measured gap and still below what a wrong weight or dtype would give.
BF16_REL = 1e-2


@pytest.fixture(scope="module")
def matrix(tiny_data, tmp_path_factory):  # noqa: F811  (the imported fixture)
    out = tmp_path_factory.mktemp("matrix")
    launch(RUN_MATRIX, [str(out / "matrix.json"), "--work", str(out / "runs"), *tiny_data], nprocs=2, timeout=600)
    return json.loads((out / "matrix.json").read_text())


def variant(matrix: dict, name: str) -> dict:
    """The variant's record; fails with DeepSpeed's or mmscale's error when its run raised."""
    rec = matrix["variants"][name]
    assert "error" not in rec, f"{name} ({rec['overrides']}) failed:\n{rec['traceback']}"
    return rec


def losses(rec: dict) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rec["history"] if "loss" in r}


def max_rel(a: dict[int, float], b: dict[int, float]) -> float:
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in b)


def assert_matches_reference(matrix: dict, name: str, rel: float) -> None:
    got, ref = losses(variant(matrix, name)), losses(variant(matrix, "zero3"))
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4], f"{name}: logged steps {sorted(got)}, zero3 {sorted(ref)}"
    assert max_rel(got, ref) <= rel, (
        f"{name}: losses differ from the fp32 ZeRO-3 run's by up to {max_rel(got, ref):.3g} relative (bound {rel})"
        f"\n  {name}: {got}\n  zero3: {ref}")


FP32_VARIANTS = ["zero0", "zero1", "zero2", "zero2_offload_opt", "zero3", "zero3_offload_opt",
                 "zero3_offload_params", "zero3_act_ckpt", "lm_path", "early_stopping"]


@pytest.mark.slow
def test_every_variant_built_what_it_asked_for(matrix):
    """Each variant built the ZeRO stage and offload it asked for, and the stage 0-2 builds made exactly the saved
    initial weights from the same seed: the shared start is the one a plain stage-0 run has."""
    expected = {"zero0": (0, False, False), "zero1": (1, False, False), "zero2": (2, False, False),
                "zero2_offload_opt": (2, True, False), "zero3": (3, False, False),
                "zero3_offload_opt": (3, True, False), "zero3_offload_params": (3, False, True)}
    for name, (stage, opt, params) in expected.items():
        rec = variant(matrix, name)
        assert rec["zero_stage_built"] == stage, f"{name}: built ZeRO stage {rec['zero_stage_built']}, asked {stage}"
        assert rec["offload_built"] == {"optimizer": opt, "params": params}, (
            f"{name}: offload built {rec['offload_built']}, asked optimizer={opt} params={params}")
    for name in ("zero0", "zero1", "zero2", "zero2_offload_opt"):
        init = variant(matrix, name)["native_init"]
        assert init["differ"] == 0, f"{name}: {init['differ']} of {init['compared']} fresh weights differ from " \
                                    f"the saved stage-0 build of the same seed, e.g. {init['examples']}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2"])
def test_zero_stages_0_to_2_match_zero3(matrix, name):
    assert_matches_reference(matrix, name, FP32_REL)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2_offload_opt", "zero3_offload_opt", "zero3_offload_params"])
def test_cpu_offload_matches_zero3(matrix, name):
    """On this CPU-only machine "offload to cpu" runs DeepSpeed's offload code paths (separate CPU buffers and
    optimizer step), not a move between devices: the numbers are proven, memory savings are not."""
    assert_matches_reference(matrix, name, FP32_REL)


@pytest.mark.slow
def test_activation_checkpointing_under_zero3_matches_and_recomputes(matrix):
    assert_matches_reference(matrix, "zero3_act_ckpt", FP32_REL)
    ref, ckpt = variant(matrix, "zero3"), variant(matrix, "zero3_act_ckpt")
    assert ref["checkpointing_layers"] == 0 and ckpt["checkpointing_layers"] > 0, (
        f"layers with gradient_checkpointing: {ckpt['checkpointing_layers']} with it on, "
        f"{ref['checkpointing_layers']} without")
    # one micro batch per rank per step, 4 steps: 4 calls of decoder layer 0's MLP, and 4 more recomputing it
    assert ref["mlp0_calls"] == 4 and ckpt["mlp0_calls"] == 8, (
        f"decoder layer 0's MLP ran {ckpt['mlp0_calls']} times with activation checkpointing, "
        f"{ref['mlp0_calls']} without (4 steps): the backward did not recompute the layer")


@pytest.mark.slow
def test_fp32_means_fp32(matrix):
    """Every parameter of every fp32 engine is float32 on every rank (ZeRO-3: its partition, `ds_tensor`)."""
    for name in FP32_VARIANTS:
        for rank, dtypes in enumerate(variant(matrix, name)["param_dtypes"]):
            assert set(dtypes) == {"torch.float32"}, f"{name}, rank {rank}: parameter dtypes {dtypes}"


@pytest.mark.slow
def test_bf16_parameters_and_loss(matrix):
    rec = variant(matrix, "bf16")
    for rank, dtypes in enumerate(rec["param_dtypes"]):
        assert set(dtypes) == {"torch.bfloat16"}, f"bf16, rank {rank}: parameter dtypes {dtypes}"
    bf16, fp32 = losses(rec), losses(variant(matrix, "zero3"))
    assert sorted(bf16) == [1, 2, 3, 4], f"bf16: logged steps {sorted(bf16)}"
    assert max_rel(bf16, fp32) <= BF16_REL, (
        f"bf16 losses differ from fp32's by up to {max_rel(bf16, fp32):.3g} relative (bound {BF16_REL})"
        f"\n  bf16: {bf16}\n  fp32: {fp32}")
    assert bf16[4] < bf16[1], f"bf16 did not train: {bf16}"


@pytest.mark.slow
def test_lm_path_loads_the_saved_weights_under_zero3(matrix):
    """`model.lm.path` under zero.Init: every LM tensor of the ZeRO-3 engine, gathered on each rank, equals the
    save_pretrained file's, none of the file's is left unused, and the model trains."""
    rec = variant(matrix, "lm_path")
    for rank, check in enumerate(rec["lm_check"]):
        assert check["zero3_partitioned"], f"rank {rank}: the LM parameters are not ZeRO-3 partitioned"
        assert check["compared"] > 0 and not check["mismatched"] and not check["unused_saved"], (
            f"rank {rank}: {check['compared']} LM tensors compared; differing from the saved LM: "
            f"{check['mismatched'][:5]}; saved but not in the engine: {check['unused_saved'][:5]}")
    got = losses(rec)
    assert sorted(got) == [1, 2, 3, 4] and got[4] < got[1], f"lm_path: losses {got}"


@pytest.mark.slow
def test_early_stopping_stops_and_checkpoints_its_state(matrix):
    """patience 2, min_delta 100: the eval at step 1 sets the best, those at steps 2 and 3 cannot improve on it
    by 100, so the run stops after step 3 of 10, and the checkpoint written at the stop holds the callback's
    state (loaded with weights_only, as --resume does), and that of a second early_stopping beside it."""
    rec = variant(matrix, "early_stopping")
    assert rec["should_stop"] and rec["trainer_step"] == 3, (
        f"stopped={rec['should_stop']} at step {rec['trainer_step']}, expected a stop at step 3")
    assert sorted(losses(rec)) == [1, 2, 3], f"train steps logged: {sorted(losses(rec))}"
    assert [r["step"] for r in rec["history"] if "val_loss" in r] == [1, 2, 3], rec["history"]
    assert rec["final_checkpoint"] == "step_00000003" and rec["checkpoint_step"] == 3, (
        f"final checkpoint {rec['final_checkpoint']} (step {rec.get('checkpoint_step')}), expected step_00000003")
    state = rec["checkpoint_callbacks"]["0:early_stopping"]
    vals = [r["val_loss"] for r in rec["history"] if "val_loss" in r]
    assert state["bad_evals"] == 2 and state["best"] == pytest.approx(vals[0]), (
        f"checkpointed early_stopping state {state}, expected bad_evals 2 and best = step 1's val_loss {vals[0]}")
    # the second instance (patience 50, no min_delta) kept its own state beside the first's
    other = rec["checkpoint_callbacks"]["1:early_stopping"]
    assert other["best"] == pytest.approx(min(vals)) and other != state, (other, state, vals)


@pytest.mark.slow
def test_zero3_initialises_like_stages_0_to_2(matrix):
    """The Hugging Face towers are built with `_from_config`, so transformers initialises them gathered under
    ZeRO-3 (plain constructors ran their init on empty partitions: embeddings N(0, 1) instead of N(0, 0.02)).
    A fresh ZeRO-3 build draws other numbers than a stage-0 build (the RNG stream differs), but from the same
    distributions: every parameter's std within 2x of the stage-0 build's (a 32-element tensor's std estimate
    varies by ~13%), or both constant."""
    init = variant(matrix, "zero3")["native_init"]
    off = {name: (z3, z0) for name, (z3, z0) in init["std"].items()
           if not (abs(z3 - z0) <= 1e-6 or (min(z3, z0) > 0 and max(z3, z0) / min(z3, z0) <= 2))}
    assert not off, (f"{len(off)} of {init['compared']} parameters initialised from another distribution under "
                     f"ZeRO-3 (std under ZeRO-3, std at stage 0): "
                     + ", ".join(f"{n} {a:.3g} vs {b:.3g}" for n, (a, b) in list(off.items())[:6]))
