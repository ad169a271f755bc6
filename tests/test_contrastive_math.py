"""The contrastive objective's math (mmscale.objectives.gather) and the retrieval metrics
(mmscale.objectives.retrieval).

The centre piece runs a real two-rank gloo process group: a global batch split over 2 ranks, each rank's loss_sum
scaled the way the trainer scales it and the parameter gradients averaged the way DeepSpeed does, must give the loss
and every gradient of one process on the whole batch.
"""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmscale.objectives.gather import all_gather_with_grad, info_nce_sums
from mmscale.objectives.retrieval import retrieval_recall

WORLD = 2
GLOBAL_B = 16
LOCAL_B = GLOBAL_B // WORLD
IMG_IN, TXT_IN, EMB = 12, 10, 6
REL = 1e-5


# ---------------------------------------------------------------------------------------------------------- helpers

def _setup() -> tuple[torch.nn.Linear, torch.nn.Linear, torch.nn.Parameter, torch.Tensor, torch.Tensor]:
    """The same tiny model and global batch in every process: weights and data come from one seeded generator (not
    the global RNG, so every rank and the parent build identical copies whatever ran before)."""
    g = torch.Generator().manual_seed(1234)
    enc_img = torch.nn.Linear(IMG_IN, EMB, dtype=torch.float64)
    enc_txt = torch.nn.Linear(TXT_IN, EMB, dtype=torch.float64)
    with torch.no_grad():
        for p in (*enc_img.parameters(), *enc_txt.parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    # log(1/0.07), CLIP's initial temperature.
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))
    images = torch.randn(GLOBAL_B, IMG_IN, generator=g, dtype=torch.float64)  # (16, 12)
    texts = torch.randn(GLOBAL_B, TXT_IN, generator=g, dtype=torch.float64)  # (16, 10)
    return enc_img, enc_txt, logit_scale, images, texts


def _params(enc_img, enc_txt, logit_scale) -> dict[str, torch.nn.Parameter]:
    named = {f"img.{n}": p for n, p in enc_img.named_parameters()}
    named.update({f"txt.{n}": p for n, p in enc_txt.named_parameters()})
    named["logit_scale"] = logit_scale
    return named


def _features(enc_img, enc_txt, images, texts) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised features (not leaves: retain_grad keeps their gradients for comparison)."""
    fi = F.normalize(enc_img(images), dim=1)  # (B, E)
    ft = F.normalize(enc_txt(texts), dim=1)  # (B, E)
    if fi.requires_grad:  # not under no_grad
        fi.retain_grad()
        ft.retain_grad()
    return fi, ft


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    """One rank of the two-rank run; writes its results to out_dir/rank{rank}.pt. An exception here makes
    mp.spawn raise in the parent with this rank's traceback."""
    torch.set_num_threads(1)  # 2 ranks on a 2-core machine
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        enc_img, enc_txt, logit_scale, images, texts = _setup()
        params = _params(enc_img, enc_txt, logit_scale)
        rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        res: dict[str, object] = {}

        # 1. Gathered negatives, the trainer's scaling (grad_accum 1), DeepSpeed's gradient averaging.
        fi, ft = _features(enc_img, enc_txt, images[rows], texts[rows])
        out = info_nce_sums(fi, ft, logit_scale, gather=True)
        (out["loss_sum"] * WORLD / GLOBAL_B).backward()
        res["loss_sum"] = out["loss_sum"].detach()
        res["count"] = out["count"]
        res["correct_i2t"] = out["correct_i2t"]
        res["correct_t2i"] = out["correct_t2i"]
        res["feat_grad_img"] = fi.grad.clone()
        res["feat_grad_txt"] = ft.grad.clone()
        grads = {}
        for name, p in params.items():
            g = p.grad.clone()
            dist.all_reduce(g, op=dist.ReduceOp.SUM)
            grads[name] = g / WORLD
        res["grads"] = grads

        # 2. Only rank 0's loss is backpropagated (rank 1 seeds with 0 but must still run the backward, which is a
        # collective): rank 1's features must still get a gradient, through the all_gather backward.
        fi, ft = _features(enc_img, enc_txt, images[rows], texts[rows])
        out = info_nce_sums(fi, ft, logit_scale, gather=True)
        seed = out["loss_sum"] if rank == 0 else out["loss_sum"] * 0
        gi, gt = torch.autograd.grad(seed, [fi, ft])
        res["rank0_loss_feat_grad_img"] = gi
        res["rank0_loss_feat_grad_txt"] = gt

        # 3. Local negatives only.
        with torch.no_grad():
            fi, ft = _features(enc_img, enc_txt, images[rows], texts[rows])
            res["local_loss_sum"] = info_nce_sums(fi, ft, logit_scale, gather=False)["loss_sum"]

        # 4. The gather itself: rank order along dim 0.
        res["gathered"] = all_gather_with_grad(torch.full((2, 3), float(rank), dtype=torch.float64))
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = REL) -> bool:
    """Relative closeness measured against the larger tensor's norm (elementwise relative error is meaningless for
    entries that are ~0)."""
    scale = max(a.norm().item(), b.norm().item(), 1e-30)
    return (a - b).norm().item() <= rel * scale


# ----------------------------------------------------------------------------------------------- two real ranks

@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> dict[str, object]:
    """Run both ranks once (spawned, real gloo group) and compute the single-process reference on all 16 rows."""
    out_dir = tmp_path_factory.mktemp("two_ranks")
    # join=True: if any rank raises, spawn stops the other and raises ProcessRaisedException with the traceback.
    mp.spawn(_rank_main, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    ranks = []
    for r in range(WORLD):
        f = out_dir / f"rank{r}.pt"
        assert f.exists(), f"rank {r} exited without writing its results ({f})"
        ranks.append(torch.load(f))

    enc_img, enc_txt, logit_scale, images, texts = _setup()
    params = _params(enc_img, enc_txt, logit_scale)
    fi, ft = _features(enc_img, enc_txt, images, texts)
    out = info_nce_sums(fi, ft, logit_scale, gather=True)  # no process group here: gather is a no-op
    (out["loss_sum"] / GLOBAL_B).backward()
    single = {
        "loss": out["loss_sum"].item() / GLOBAL_B,
        "correct_i2t": out["correct_i2t"].item(),
        "correct_t2i": out["correct_t2i"].item(),
        "grads": {n: p.grad.clone() for n, p in params.items()},
        "feat_grad_img": fi.grad.clone(),
        "feat_grad_txt": ft.grad.clone(),
    }
    # Gradient of the loss over rows 0..7 only (rank 0's rows) w.r.t. every row's features.
    fi, ft = _features(enc_img, enc_txt, images, texts)
    logits = logit_scale.exp() * fi @ ft.T  # (16, 16)
    target = torch.arange(GLOBAL_B)
    first_half = (F.cross_entropy(logits[:LOCAL_B], target[:LOCAL_B], reduction="sum")
                  + F.cross_entropy(logits.T[:LOCAL_B], target[:LOCAL_B], reduction="sum")) / 2
    single["rank0_loss_feat_grad_img"], single["rank0_loss_feat_grad_txt"] = torch.autograd.grad(first_half, [fi, ft])
    return {"ranks": ranks, "single": single}


def test_gathered_loss_and_gradients_equal_one_process_on_the_global_batch(two_rank_run):
    ranks, single = two_rank_run["ranks"], two_rank_run["single"]
    assert [int(r["count"]) for r in ranks] == [LOCAL_B] * WORLD
    loss = sum(r["loss_sum"].item() for r in ranks) / sum(int(r["count"]) for r in ranks)
    assert math.isclose(loss, single["loss"], rel_tol=REL), (loss, single["loss"])
    # Rank 1's targets are 8..15: the accuracy counts only add up to the single process's with the right offset.
    assert sum(int(r["correct_i2t"]) for r in ranks) == single["correct_i2t"]
    assert sum(int(r["correct_t2i"]) for r in ranks) == single["correct_t2i"]
    assert set(single["grads"]) == {"img.weight", "img.bias", "txt.weight", "txt.bias", "logit_scale"}
    for name, ref in single["grads"].items():
        assert ref.abs().max() > 0, name  # a zero reference would make the comparison vacuous
        for r, res in enumerate(ranks):
            assert _close(res["grads"][name], ref), (name, r, res["grads"][name], ref)


def test_each_ranks_feature_gradient_includes_the_other_ranks_losses(two_rank_run):
    """Before DeepSpeed's 1/W averaging, rank r's feature gradient is W * dL/df for its rows (module docstring):
    compare with the single process's rows; then check directly that rank 0's loss alone moves rank 1's features."""
    ranks, single = two_rank_run["ranks"], two_rank_run["single"]
    for r, res in enumerate(ranks):
        rows = slice(r * LOCAL_B, (r + 1) * LOCAL_B)
        for kind in ("img", "txt"):
            got = res[f"feat_grad_{kind}"] / WORLD
            assert _close(got, single[f"feat_grad_{kind}"][rows]), (r, kind)

    for kind in ("img", "txt"):
        on_rank1 = ranks[1][f"rank0_loss_feat_grad_{kind}"]
        ref = single[f"rank0_loss_feat_grad_{kind}"][LOCAL_B:]  # d(rows 0..7 loss) / d(rows 8..15 features)
        assert ref.norm() > 1e-3, kind  # the other half's features do enter rank 0's loss (as negatives)
        assert _close(on_rank1, ref), (kind, on_rank1, ref)
        assert _close(ranks[0][f"rank0_loss_feat_grad_{kind}"], single[f"rank0_loss_feat_grad_{kind}"][:LOCAL_B])


def test_without_gather_the_loss_is_not_the_global_one(two_rank_run):
    ranks, single = two_rank_run["ranks"], two_rank_run["single"]
    local = sum(r["local_loss_sum"].item() for r in ranks) / GLOBAL_B
    # 8 negatives per row instead of 16: a much easier task, a clearly different loss.
    assert abs(local - single["loss"]) > 1e-3 * abs(single["loss"]), (local, single["loss"])


def test_all_gather_with_grad_concatenates_in_rank_order(two_rank_run):
    expected = torch.cat([torch.full((2, 3), float(r), dtype=torch.float64) for r in range(WORLD)])
    for res in two_rank_run["ranks"]:
        assert torch.equal(res["gathered"], expected)


# -------------------------------------------------------------------------------------------- single process

def _reference_info_nce(image: torch.Tensor, text: torch.Tensor, log_scale: float) -> tuple[float, int, int]:
    """From the definition, float64, log-softmax by hand: (loss_sum, correct_i2t, correct_t2i)."""
    image, text = image.double(), text.double()
    s = min(math.exp(log_scale), 100.0)
    logits = s * image @ text.T  # (B, B); row i: image i against every text, diagonal = positives

    def log_softmax(x: torch.Tensor) -> torch.Tensor:
        m = x.max(dim=1, keepdim=True).values
        return x - m - (x - m).exp().sum(dim=1, keepdim=True).log()

    diag = torch.arange(image.shape[0])
    ce_i2t = -log_softmax(logits)[diag, diag]
    ce_t2i = -log_softmax(logits.T)[diag, diag]
    loss_sum = ((ce_i2t + ce_t2i) / 2).sum().item()
    return loss_sum, int((logits.argmax(1) == diag).sum()), int((logits.T.argmax(1) == diag).sum())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_info_nce_sums_matches_the_definition(dtype):
    g = torch.Generator().manual_seed(7)
    b, e = 9, 5
    image = F.normalize(torch.randn(b, e, generator=g, dtype=dtype), dim=1)
    # Texts correlated with their images, so that some but not all rows are retrieved correctly.
    text = F.normalize(image + 0.8 * torch.randn(b, e, generator=g, dtype=dtype), dim=1)
    log_scale = math.log(1 / 0.2)
    ref_loss, ref_i2t, ref_t2i = _reference_info_nce(image, text, log_scale)
    assert 0 < ref_i2t < b and 0 < ref_t2i < b  # a degenerate batch would not test the counts
    for gather in (True, False):  # no process group: both mean local negatives
        out = info_nce_sums(image, text, torch.tensor(log_scale, dtype=dtype), gather=gather)
        assert out["loss_sum"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert math.isclose(out["loss_sum"].item(), ref_loss, rel_tol=1e-12 if dtype == torch.float64 else 1e-5)
        assert out["count"].dtype == torch.int64 and int(out["count"]) == b
        assert int(out["correct_i2t"]) == ref_i2t and int(out["correct_t2i"]) == ref_t2i


def test_bf16_embeddings_give_an_fp32_loss():
    g = torch.Generator().manual_seed(3)
    image = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    text = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    out = info_nce_sums(image.bfloat16(), text.bfloat16(), torch.tensor(math.log(10.0)))
    assert out["loss_sum"].dtype == torch.float32
    ref_loss, _, _ = _reference_info_nce(image.bfloat16().float(), text.bfloat16().float(), math.log(10.0))
    assert math.isclose(out["loss_sum"].item(), ref_loss, rel_tol=1e-5)


def test_logit_scale_is_clamped_at_100():
    g = torch.Generator().manual_seed(5)
    image = F.normalize(torch.randn(7, 4, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(7, 4, generator=g, dtype=torch.float64), dim=1)

    def loss(log_scale: float) -> float:
        return info_nce_sums(image, text, torch.tensor(log_scale, dtype=torch.float64))["loss_sum"].item()

    at_cap = loss(math.log(100.0))
    assert math.isclose(loss(math.log(100.0) + 1.0), at_cap, rel_tol=1e-12)
    assert math.isclose(loss(10.0), at_cap, rel_tol=1e-12)
    assert math.isclose(at_cap, _reference_info_nce(image, text, math.log(100.0))[0], rel_tol=1e-12)
    # Below the cap the scale does matter (otherwise the equalities above would prove nothing).
    assert abs(loss(math.log(50.0)) - at_cap) > 1e-3 * at_cap
    # Above the cap the scale gets no gradient (the clamp is flat there).
    p = torch.nn.Parameter(torch.tensor(math.log(100.0) + 1.0, dtype=torch.float64))
    info_nce_sums(image, text, p)["loss_sum"].backward()
    assert p.grad.item() == 0.0


def test_info_nce_sums_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        info_nce_sums(torch.zeros(4, 3), torch.zeros(5, 3), torch.tensor(0.0))


# ------------------------------------------------------------------------------------------------- retrieval

def _hand_example() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """4 pairs, "dog" twice. Texts are the axes; images are chosen so that:
      image0 = e1 -> nearest text1 ("dog", not its own text0)     duplicate-aware hit,  exact-index miss
      image1 = e0 -> nearest text0 ("dog", not its own text1)     duplicate-aware hit,  exact-index miss
      image2 ~ (0.1, 0, 0.3, 0.9) -> text3, text2, text0, text1   its "cat" at rank 1:  miss@1, hit@2
      image3 = e3 -> text3                                        hit
    Text -> image (cosines with image2 = that vector / sqrt(0.91)):
      text0 = e0: image1 (1) > image2 (0.105) > ...    "dog" -> hit;  exact-index (image0) miss
      text1 = e1: image0 (1)                           "dog" -> hit;  exact-index (image1) miss
      text2 = e2: image2 (0.314) > others (0)          hit
      text3 = e3: image3 (1) > image2 (0.943)          hit
    """
    text = torch.eye(4)
    image = torch.stack([torch.eye(4)[1], torch.eye(4)[0], torch.tensor([0.1, 0.0, 0.3, 0.9]), torch.eye(4)[3]])
    return image, text, ["dog", "dog", "cat", "car"]


def test_recall_counts_a_duplicate_caption_as_right():
    image, text, captions = _hand_example()
    r = retrieval_recall(image, text, captions, ks=(1, 2, 10))
    assert r["i2t_recall_at_1"] == pytest.approx(3 / 4)  # image2 misses
    assert r["i2t_recall_at_2"] == pytest.approx(1.0)
    assert r["i2t_recall_at_10"] == pytest.approx(1.0)  # k capped at N = 4
    assert r["t2i_recall_at_1"] == pytest.approx(1.0)
    assert r["t2i_recall_at_2"] == pytest.approx(1.0)
    assert r["num_pairs"] == 4 and r["distinct_captions"] == 3
    # (2 + 2 + 1 + 1) / 4 pairs / 4 candidates
    assert r["chance_recall_at_1"] == pytest.approx(6 / 16)

    # Exact-index recall of the same embeddings is lower: giving every pair a unique caption turns it into that.
    exact = retrieval_recall(image, text, ["dog0", "dog1", "cat", "car"], ks=(1, 2))
    assert exact["i2t_recall_at_1"] == pytest.approx(1 / 4)  # only image3
    assert exact["t2i_recall_at_1"] == pytest.approx(2 / 4)  # text2, text3
    assert exact["chance_recall_at_1"] == pytest.approx(1 / 4)
    assert exact["distinct_captions"] == 4


def test_perfect_embeddings_give_recall_one():
    g = torch.Generator().manual_seed(11)
    emb = torch.randn(50, 8, generator=g)
    captions = [f"caption {i % 20}" for i in range(50)]  # duplicates, with distinct embeddings
    r = retrieval_recall(emb, emb.clone(), captions)
    for k in (1, 5, 10):
        assert r[f"i2t_recall_at_{k}"] == 1.0 and r[f"t2i_recall_at_{k}"] == 1.0
    # 10 captions occur 3 times, 10 twice: (30*3 + 20*2) / 50 / 50
    assert r["chance_recall_at_1"] == pytest.approx((30 * 3 + 20 * 2) / 50 / 50)
    assert r["distinct_captions"] == 20 and r["num_pairs"] == 50


def test_ties_are_broken_by_index():
    # All images and texts identical: every ranking is the index order, so image i's top-1 is text0 and text j's
    # top-1 is image0 -- right exactly for the pairs captioned like pair 0.
    emb = torch.ones(5, 3)
    r = retrieval_recall(emb, emb, ["a", "b", "a", "c", "b"], ks=(1, 2))
    assert r["i2t_recall_at_1"] == pytest.approx(2 / 5) and r["t2i_recall_at_1"] == pytest.approx(2 / 5)
    # top-2 is {0, 1}: captions "a" and "b" -> pairs 0, 1, 2, 4
    assert r["i2t_recall_at_2"] == pytest.approx(4 / 5) and r["t2i_recall_at_2"] == pytest.approx(4 / 5)


def _brute_force_recall(image: torch.Tensor, text: torch.Tensor, captions: list[str], k: int) -> tuple[float, float]:
    """Full similarity matrix, stable descending sort (ties by index), look for a matching caption in the top-k."""
    sims = F.normalize(image.float(), dim=1) @ F.normalize(text.float(), dim=1).T  # (N, N)

    def recall(s: torch.Tensor) -> float:
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
        return sum(any(captions[j] == captions[i] for j in order[i].tolist()) for i in range(len(captions))) / len(
            captions)

    return recall(sims), recall(sims.T)


def test_chunking_does_not_change_the_result_and_matches_brute_force():
    g = torch.Generator().manual_seed(13)
    n = 37
    image = torch.randn(n, 16, generator=g)
    text = image + 1.5 * torch.randn(n, 16, generator=g)  # noisy: recalls strictly between 0 and 1
    captions = [f"c{int(i)}" for i in torch.randint(0, 12, (n,), generator=g)]
    small = retrieval_recall(image, text, captions, ks=(1, 5, 10), chunk=3)
    big = retrieval_recall(image, text, captions, ks=(1, 5, 10), chunk=4096)
    assert small == big
    assert 0 < big["i2t_recall_at_1"] < 1 and 0 < big["t2i_recall_at_1"] < 1
    for k in (1, 5, 10):
        i2t, t2i = _brute_force_recall(image, text, captions, k)
        assert big[f"i2t_recall_at_{k}"] == pytest.approx(i2t)
        assert big[f"t2i_recall_at_{k}"] == pytest.approx(t2i)


def test_retrieval_rejects_bad_input():
    with pytest.raises(ValueError, match="captions"):
        retrieval_recall(torch.zeros(3, 2), torch.zeros(3, 2), ["a", "b"])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recall(torch.full((2, 2), float("nan")), torch.zeros(2, 2), ["a", "b"])
