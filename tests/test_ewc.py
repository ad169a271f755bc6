"""EWC math (mmscale.continual.ewc): the penalty and its closed-form gradient (autograd, float64 finite differences),
the Fisher against a logistic-regression closed form, ZeRO-3-style partitions against full tensors (padding
ignored), online vs separate tasks, state round trip, and that EWC keeps a learned task on a tiny model. Fast, CPU,
no DeepSpeed, no process group."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmscale.continual.ewc import EWCState, FisherAccumulator, partition_valid_numel

LAM = 3.0


@pytest.fixture(autouse=True)
def one_thread():
    """Every tensor here is tiny: intra-op threads only add barriers, and on a busy machine (other processes on the
    cores) each barrier can wait for a time slice: test_ewc_keeps_task_a took 0.2 s on 1 thread, up to 50 s on 2."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def random_like(slots, seed: int, positive: bool = False, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in slots:
        t = torch.randn(s.numel(), generator=g, dtype=torch.float64).to(s.dtype) * scale
        out.append(t.abs() + 0.1 if positive else t)
    return out


def flat_params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().reshape(-1).clone() for p in model.parameters()]


def zero3_partition(flat: torch.Tensor, world: int, rank: int, pad_value: float) -> tuple[torch.Tensor, int]:
    """Rank `rank`'s ZeRO-3 partition of a flat tensor: ceil(numel / world) elements, the tail padded with
    `pad_value` (DeepSpeed leaves padding uninitialised: anything, NaN included); and its valid count."""
    size = math.ceil(flat.numel() / world)
    valid = partition_valid_numel(flat.numel(), size, rank)
    part = torch.full((size,), pad_value, dtype=flat.dtype)
    part[:valid] = flat[rank * size: rank * size + valid]
    return part, valid


# ------------------------------------------------------------------------------------ (1) zero at the anchor

@pytest.mark.parametrize("mode", ["separate", "online"])
def test_penalty_and_gradient_are_zero_at_the_anchor(mode):
    model = mlp()
    params = list(model.parameters())
    fisher = random_like(params, seed=1, positive=True)
    state = EWCState(LAM, mode=mode, dtype=torch.float64)
    assert state.penalty(params).item() == 0.0  # no task yet
    state.consolidate(params, fisher)

    pen = state.penalty(params)
    assert pen.item() == 0.0
    pen.backward()
    for p, g in zip(params, state.penalty_grad(params)):
        assert torch.count_nonzero(p.grad) == 0
        assert torch.count_nonzero(g) == 0

    # one element moved by delta: exactly lambda/2 * F * delta^2, and the gradient lambda * F * delta there only
    delta, which = 0.25, 3
    with torch.no_grad():
        params[0].view(-1)[which] += delta
    expected = 0.5 * LAM * fisher[0][which].item() * delta**2
    assert state.penalty(params).item() == pytest.approx(expected, rel=1e-12)
    grads = state.penalty_grad(params)
    assert grads[0].view(-1)[which].item() == pytest.approx(LAM * fisher[0][which].item() * delta, rel=1e-12)
    assert sum(torch.count_nonzero(g).item() for g in grads) == 1


# ------------------------------------------------------------------------------------ (2) gradient checks

def two_task_state(params, mode: str, dtype: torch.dtype = torch.float64) -> EWCState:
    state = EWCState(LAM, mode=mode, gamma=0.5 if mode == "online" else 1.0, dtype=dtype)
    for seed in (10, 20):
        anchor = [p.detach().reshape(-1) + a for p, a in zip(params, random_like(params, seed, scale=0.3))]
        state.consolidate(anchor, random_like(params, seed + 1, positive=True))
    return state


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_autograd_gradient_equals_penalty_grad_and_finite_differences(mode):
    model = mlp(torch.float64)
    params = list(model.parameters())  # slots of any shape are read flattened
    state = two_task_state(params, mode)

    pen = state.penalty(params)
    assert pen.item() > 0.1
    pen.backward()
    closed = state.penalty_grad(params)
    for p, g in zip(params, closed):
        assert g.shape == p.shape and g.dtype == torch.float64
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)

    # central differences in float64: the penalty is quadratic, so they are exact up to rounding
    h = 1e-4
    with torch.no_grad():
        for p, g in zip(params, closed):
            flat = p.view(-1)
            fd = torch.empty_like(flat)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + h
                up = state.penalty(params).item()
                flat[i] = old - h
                down = state.penalty(params).item()
                flat[i] = old
                fd[i] = (up - down) / (2 * h)
            torch.testing.assert_close(fd, g.view(-1), rtol=1e-7, atol=1e-9)


def test_float32_and_bfloat16_slots():
    model = mlp(torch.float32)
    params = list(model.parameters())
    state = two_task_state(params, "separate", dtype=torch.float32)
    pen = state.penalty(params)
    assert pen.dtype == torch.float32
    pen.backward()
    for p, g in zip(params, state.penalty_grad(params)):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    # bf16 slots (ZeRO-3 ds_tensor in bf16 training): computed and returned in the state's fp32
    half = [p.detach().to(torch.bfloat16) for p in params]
    grads = state.penalty_grad(half)
    assert all(g.dtype == torch.float32 and g.shape == h.shape for g, h in zip(grads, half))
    assert state.penalty(half).dtype == torch.float32
    torch.testing.assert_close(state.penalty(half), pen.detach(), rtol=2e-2, atol=0)


# ------------------------------------------------------------------------------------ (3) Fisher closed form

def logistic_data(n: int = 64, d: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (torch.rand(n, generator=g, dtype=torch.float64) < 0.5).double()
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
        model.bias.fill_(0.3)
    # d log p(y|x) / dw = (y - p) x, d / db = y - p   (p = sigmoid(w.x + b))
    r = y - torch.sigmoid(x @ model.weight.view(-1) + model.bias)
    return x, y, model, r[:, None] * x, r


def loss_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of the mean negative log-likelihood over the rows of x."""
    model.zero_grad()
    F.binary_cross_entropy_with_logits(model(x).view(-1), y).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_fisher_per_sample_matches_logistic_regression_closed_form(dtype, rtol):
    x, y, model, g_w, g_b = logistic_data()
    acc = FisherAccumulator(list(model.parameters()), dtype=dtype)
    for i in range(len(x)):
        acc.add(loss_grads(model, x[i:i + 1], y[i:i + 1]))
    fisher_w, fisher_b = acc.result()
    assert fisher_w.dtype == dtype and fisher_w.shape == (3,) and fisher_b.shape == (1,)
    torch.testing.assert_close(fisher_w.double(), (g_w**2).mean(0), rtol=rtol, atol=0)
    torch.testing.assert_close(fisher_b.double(), (g_b**2).mean().view(1), rtol=rtol, atol=0)


def test_fisher_per_batch_and_weights():
    x, y, model, g_w, g_b = logistic_data(n=64)
    B = 8
    acc = FisherAccumulator(list(model.parameters()), dtype=torch.float64)
    for k in range(0, len(x), B):
        acc.add(loss_grads(model, x[k:k + B], y[k:k + B]), batch_size=B)
    # each batch contributes B * (mean gradient over the batch)^2
    mean_w = g_w.view(-1, B, 3).mean(1)
    mean_b = g_b.view(-1, B).mean(1)
    fisher_w, fisher_b = acc.result()
    torch.testing.assert_close(fisher_w, (B * mean_w**2).mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(fisher_b, (B * mean_b**2).mean().view(1), rtol=1e-12, atol=0)

    # weights: sum(w * g^2) / sum(w); a parameter without a gradient (None) counts as 0
    w = torch.arange(1, len(x) + 1, dtype=torch.float64)
    acc = FisherAccumulator(list(model.parameters()), dtype=torch.float64)
    for i in range(len(x)):
        acc.add([loss_grads(model, x[i:i + 1], y[i:i + 1])[0], None], weight=w[i].item())
    fisher_w, fisher_b = acc.result()
    torch.testing.assert_close(fisher_w, (w[:, None] * g_w**2).sum(0) / w.sum(), rtol=1e-12, atol=0)
    assert torch.count_nonzero(fisher_b) == 0


def test_fisher_refuses_bad_input():
    slots = [torch.zeros(4), torch.zeros(2)]
    acc = FisherAccumulator(slots)
    with pytest.raises(RuntimeError, match="before any add"):
        acc.result()
    with pytest.raises(ValueError, match="1 gradients for 2 slots"):
        acc.add([torch.ones(4)])
    with pytest.raises(ValueError, match="gradient 1 has 3 elements, its slot 2"):
        acc.add([torch.ones(4), torch.ones(3)])
    with pytest.raises(ValueError, match="batch_size=0"):
        acc.add([torch.ones(4), torch.ones(2)], batch_size=0)
    with pytest.raises(ValueError, match="weight=-1"):
        acc.add([torch.ones(4), torch.ones(2)], weight=-1)
    with pytest.raises(ValueError, match=r"valid\[1\] = 3: must be an int in \[0, 2\]"):
        FisherAccumulator(slots, valid=[4, 3])


# ------------------------------------------------------------------------------------ (4) partitions == full

@pytest.mark.parametrize("mode", ["separate", "online"])
@pytest.mark.parametrize("world", [2, 3])
def test_partitioned_equals_full(mode, world):
    numels = [7, 10, 1, 3, 66]  # odd sizes: padded last partitions, and ranks with nothing of a 1-element slot
    gamma = 0.5 if mode == "online" else 1.0
    gen = torch.Generator().manual_seed(0)

    def rand(n):
        return torch.randn(n, generator=gen, dtype=torch.float64)

    samples = [[[rand(n) for n in numels] for _ in range(5)] for _ in range(2)]  # [task][sample][slot] gradients
    anchors = [[rand(n) for n in numels] for _ in range(2)]  # [task][slot]
    current = [rand(n) for n in numels]

    full = EWCState(LAM, mode=mode, gamma=gamma, dtype=torch.float64)
    full_fishers = []
    for task in range(2):
        acc = FisherAccumulator(anchors[task], dtype=torch.float64)
        for grads in samples[task]:
            acc.add(grads)
        full_fishers.append(acc.result())
        full.consolidate(anchors[task], full_fishers[-1])
    full_penalty = full.penalty(current)
    full_grad = full.penalty_grad(current)

    total = torch.zeros((), dtype=torch.float64)
    grad_parts = [[] for _ in numels]
    for rank in range(world):
        parts = [zero3_partition(t, world, rank, pad_value=float("nan")) for t in current]
        cur = [p for p, _ in parts]
        valid = [v for _, v in parts]
        state = EWCState(LAM, mode=mode, gamma=gamma, dtype=torch.float64)
        for task in range(2):
            slots = [zero3_partition(a, world, rank, pad_value=float("nan"))[0] for a in anchors[task]]
            acc = FisherAccumulator(slots, valid=valid, dtype=torch.float64)
            for grads in samples[task]:
                acc.add([zero3_partition(g, world, rank, pad_value=float("nan"))[0] for g in grads])
            fisher = acc.result()
            for i, f in enumerate(fisher):  # the Fisher of this rank's elements, nothing of the padding
                size = cur[i].numel()
                torch.testing.assert_close(f, full_fishers[task][i][rank * size: rank * size + valid[i]],
                                           rtol=1e-14, atol=0)
            state.consolidate(slots, fisher)
        # memory: one anchor and one Fisher value per valid element per kept task
        assert sum(a.numel() for task in state.anchors for a in task) == state.num_kept * sum(valid)
        assert state.num_kept == (2 if mode == "separate" else 1)

        leaves = [c.clone().requires_grad_(True) for c in cur]
        pen = state.penalty(leaves)
        assert torch.isfinite(pen)
        pen.backward()
        total += pen.detach()
        for i, (leaf, g) in enumerate(zip(leaves, state.penalty_grad(cur))):
            assert torch.count_nonzero(g[valid[i]:]) == 0 and torch.count_nonzero(leaf.grad[valid[i]:]) == 0
            torch.testing.assert_close(leaf.grad, g, rtol=1e-12, atol=1e-14)
            grad_parts[i].append(g[:valid[i]])

    torch.testing.assert_close(total, full_penalty, rtol=1e-12, atol=0)
    for i, g in enumerate(full_grad):
        torch.testing.assert_close(torch.cat(grad_parts[i]), g, rtol=1e-12, atol=0)


def test_partition_valid_numel():
    # 10 elements over 3 ranks: partitions of 4, the last one 2 real + 2 padding
    assert [partition_valid_numel(10, 4, r) for r in range(3)] == [4, 4, 2]
    assert [partition_valid_numel(1, 1, r) for r in range(2)] == [1, 0]
    assert [partition_valid_numel(8, 4, r) for r in range(2)] == [4, 4]


# ------------------------------------------------------------------------------------ (5) online / separate

def test_online_decays_fisher_and_keeps_the_latest_anchor():
    gen = torch.Generator().manual_seed(3)
    fishers = [[torch.rand(4, generator=gen, dtype=torch.float64)] for _ in range(3)]
    anchors = [[torch.randn(4, generator=gen, dtype=torch.float64)] for _ in range(3)]
    theta = [torch.randn(4, generator=gen, dtype=torch.float64)]
    state = EWCState(LAM, mode="online", gamma=0.5, dtype=torch.float64)

    state.consolidate(anchors[0], fishers[0])
    snapshot = state.state_dict()
    state.consolidate(anchors[1], fishers[1])
    assert state.num_kept == 1 and state.num_consolidated == 2
    f2 = [0.5 * fishers[0][0][i].item() + fishers[1][0][i].item() for i in range(4)]
    assert state.fishers[0][0].tolist() == pytest.approx(f2, rel=1e-15)
    assert torch.equal(state.anchors[0][0], anchors[1][0])
    by_hand = 0.5 * LAM * sum(f2[i] * (theta[0][i].item() - anchors[1][0][i].item()) ** 2 for i in range(4))
    assert state.penalty(theta).item() == pytest.approx(by_hand, rel=1e-12)
    assert state.penalty(anchors[1]).item() == 0.0
    # the earlier state_dict is a snapshot: consolidating did not change it
    assert torch.equal(snapshot["fishers"][0][0], fishers[0][0])
    assert torch.equal(snapshot["anchors"][0][0], anchors[0][0])

    state.consolidate(anchors[2], fishers[2])
    f3 = [0.25 * fishers[0][0][i].item() + 0.5 * fishers[1][0][i].item() + fishers[2][0][i].item()
          for i in range(4)]
    assert state.fishers[0][0].tolist() == pytest.approx(f3, rel=1e-15)
    assert torch.equal(state.anchors[0][0], anchors[2][0])


def test_separate_keeps_every_anchor():
    gen = torch.Generator().manual_seed(4)
    fishers = [[torch.rand(5, generator=gen, dtype=torch.float64)] for _ in range(2)]
    anchors = [[torch.randn(5, generator=gen, dtype=torch.float64)] for _ in range(2)]
    state = EWCState(LAM, mode="separate", dtype=torch.float64)
    for a, f in zip(anchors, fishers):
        state.consolidate(a, f)
    assert state.num_kept == 2
    assert torch.equal(state.anchors[0][0], anchors[0][0]) and torch.equal(state.anchors[1][0], anchors[1][0])

    def by_hand(theta):
        return 0.5 * LAM * sum(fishers[t][0][i].item() * (theta[i] - anchors[t][0][i].item()) ** 2
                               for t in range(2) for i in range(5))

    for theta in (anchors[0][0], anchors[1][0]):  # at either anchor the other task still pulls
        pen = state.penalty([theta]).item()
        assert pen > 0 and pen == pytest.approx(by_hand(theta.tolist()), rel=1e-12)
    mid = [(anchors[0][0] + anchors[1][0]) / 2]
    grad = state.penalty_grad(mid)[0]
    by_hand_grad = LAM * (fishers[0][0] * (mid[0] - anchors[0][0]) + fishers[1][0] * (mid[0] - anchors[1][0]))
    torch.testing.assert_close(grad, by_hand_grad, rtol=1e-12, atol=0)


def test_consolidate_copies_its_inputs():
    a, f = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    state = EWCState(LAM, dtype=torch.float64)
    state.consolidate([a], [f])
    before = state.penalty([torch.zeros(6, dtype=torch.float64)]).item()
    a.add_(1.0)
    f.mul_(2.0)
    assert state.penalty([torch.zeros(6, dtype=torch.float64)]).item() == before


def test_state_refuses_bad_arguments():
    with pytest.raises(ValueError, match="mode='ring'"):
        EWCState(1.0, mode="ring")
    with pytest.raises(ValueError, match="lam=-1"):
        EWCState(-1)
    with pytest.raises(ValueError, match="gamma=0.9 with mode='separate'"):
        EWCState(1.0, gamma=0.9)
    with pytest.raises(ValueError, match="gamma=1.5"):
        EWCState(1.0, mode="online", gamma=1.5)
    state = EWCState(1.0)
    state.consolidate([torch.zeros(4), torch.zeros(3)], [torch.ones(4), torch.ones(3)])
    with pytest.raises(ValueError, match="slot 1 has 2 elements, but it had 3"):
        state.penalty([torch.zeros(4), torch.zeros(2)])
    with pytest.raises(ValueError, match="1 slots, but the EWC state was consolidated with 2"):
        state.penalty_grad([torch.zeros(4)])
    with pytest.raises(ValueError, match="non-finite or negative"):
        state.consolidate([torch.zeros(4), torch.zeros(3)], [torch.ones(4), torch.tensor([1.0, -1.0, 0.0])])


# ------------------------------------------------------------------------------------ (6) state round trip

@pytest.mark.parametrize("mode", ["separate", "online"])
def test_state_dict_round_trip(mode, tmp_path):
    model = mlp(torch.float32)
    params = list(model.parameters())
    gamma = 0.5 if mode == "online" else 1.0
    state = two_task_state(params, mode, dtype=torch.float32)
    torch.save({"ewc": state.state_dict()}, tmp_path / "state.pt")

    loaded = EWCState(LAM, mode=mode, gamma=gamma)
    loaded.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["ewc"])
    assert loaded.num_kept == state.num_kept and loaded.num_consolidated == 2
    assert torch.equal(loaded.penalty(params), state.penalty(params))
    for a, b in zip(loaded.penalty_grad(params), state.penalty_grad(params)):
        assert torch.equal(a, b)
    # and they go on alike
    more = random_like(params, seed=99, positive=True)
    for s in (state, loaded):
        s.consolidate(flat_params(model), more)
    assert torch.equal(loaded.penalty([p * 1.1 for p in params]), state.penalty([p * 1.1 for p in params]))

    other = EWCState(LAM, mode="online" if mode == "separate" else "separate")
    with pytest.raises(ValueError, match=f"saved in mode '{mode}'"):
        other.load_state_dict(state.state_dict())


# ------------------------------------------------------------------------------------ (7) EWC protects task A

def blobs(center_x: float, flip: bool, gen: torch.Generator, n: int = 200):
    """2-D points around (center_x, 0); the label is the sign of the second coordinate, plus noise (classes overlap,
    so a trained model keeps a non-zero loss and the empirical Fisher is not ~0), inverted when `flip`."""
    x = torch.randn(n, 2, generator=gen) + torch.tensor([center_x, 0.0])
    y = ((x[:, 1] + 0.7 * torch.randn(n, generator=gen) > 0) ^ flip).long()
    return x, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ewc_keeps_task_a(seed):
    gen = torch.Generator().manual_seed(seed)
    task_a = blobs(-3.0, False, gen)
    task_b = blobs(3.0, True, gen)  # elsewhere, the opposite rule: plain training on B overwrites A
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
    params = list(model.parameters())

    def loss_on(task):
        with torch.no_grad():
            return F.cross_entropy(model(task[0]), task[1]).item()

    def train(task, ewc=None, steps=200):
        opt = torch.optim.Adam(params, lr=0.03)
        for _ in range(steps):
            opt.zero_grad()
            loss = F.cross_entropy(model(task[0]), task[1])
            if ewc is not None:
                loss = loss + ewc.penalty(params)
            loss.backward()
            opt.step()

    train(task_a)
    loss_a_learned, loss_b_before = loss_on(task_a), loss_on(task_b)
    assert loss_a_learned < 0.5

    acc = FisherAccumulator(params)
    x, y = task_a
    for i in range(len(x)):  # per-sample gradients: the exact empirical Fisher
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        acc.add([p.grad for p in params])
    ewc = EWCState(30.0)
    ewc.consolidate(params, acc.result())

    after_a = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    for name, penalty in (("plain", None), ("ewc", ewc)):
        model.load_state_dict(after_a)
        train(task_b, penalty)
        results[name] = (loss_on(task_a), loss_on(task_b))

    forgetting_plain = results["plain"][0] - loss_a_learned
    forgetting_ewc = results["ewc"][0] - loss_a_learned
    assert forgetting_plain > 1.0, results  # the setup does forget without EWC
    assert forgetting_ewc < 0.5 * forgetting_plain, (forgetting_ewc, forgetting_plain)
    assert results["ewc"][1] < min(math.log(2), 0.5 * loss_b_before), results  # and B is still learned
