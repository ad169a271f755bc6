"""Mixtures of sources (`data.sources`): proportions, determinism, each source's own epochs, exact resume, resume on
another layout, and the config's checks. Real shards, real tokenizer; sources are told apart by their key prefix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mmscale.config import ConfigError, DataConfig, SourceSpec
from mmscale.job.preflight import load_config
from mmscale.data import TrainLoader, make_shapes_dataset
from test_data_resume import run  # n batches and the state before each


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """cap: 8 shards x 8 samples, doc: 4 shards x 8 (8 px); keys `cap...` and `doc...`."""
    root = tmp_path_factory.mktemp("mixture")
    return {
        "cap": make_shapes_dataset(root / "cap", 64, 8, 8, seed=3, prefix="cap"),
        "doc": make_shapes_dataset(root / "doc", 32, 8, 8, seed=4, prefix="doc"),
    }


def mix_cfg(sources, weights=(0.7, 0.3), **kw) -> DataConfig:
    base = dict(image_size=8, max_text_len=12, shuffle_buffer=8, num_workers=0, warn_every=100,
                sources=[SourceSpec(name, str(path), w) for (name, path), w in zip(sources.items(), weights)])
    base.update(kw)
    return DataConfig(**base)


def keys(batches: list[dict], prefix: str = "") -> list[str]:
    return [k for b in batches for k in b["__key__"] if k.startswith(prefix)]


def test_mixture_proportions_and_source_epochs(sources, sp_tokenizer):
    loader = TrainLoader(mix_cfg(sources), sp_tokenizer, 50, 0, 1, seed=1)
    assert loader.samples_per_epoch == 96  # the sum of the sources' sizes.json counts (no data.num_samples)
    batches = run(loader, 200)[0]
    got = keys(batches)
    assert len(got) == 10_000 and loader.num_decoded == 10_000
    n_cap = sum(k.startswith("cap") for k in got)
    assert abs(n_cap - 7000) <= 4 * math.sqrt(10_000 * 0.7 * 0.3)  # binomial, 4 sigma: 183
    # each source runs through its own epochs: every 64 cap samples (32 doc) are that source's samples once each
    cap, doc = keys(batches, "cap"), keys(batches, "doc")
    for stream, size in ((cap, 64), (doc, 32)):
        epochs = [stream[i: i + size] for i in range(0, 3 * size, size)]
        assert all(len(set(e)) == size for e in epochs) and set(epochs[0]) == set(epochs[1]) == set(epochs[2])
        assert epochs[0] != epochs[1]  # reshuffled
    # deterministic from the seed
    again = TrainLoader(mix_cfg(sources), sp_tokenizer, 50, 0, 1, seed=1)
    assert keys(run(again, 4)[0]) == got[:200]
    other = TrainLoader(mix_cfg(sources), sp_tokenizer, 50, 0, 1, seed=2)
    assert keys(run(other, 4)[0]) != got[:200]


def test_mixture_resumes_exactly(sources, sp_tokenizer):
    def loader():
        return TrainLoader(mix_cfg(sources, num_workers=2), sp_tokenizer, 4, 0, 1, seed=7)

    assert loader().steps_per_epoch == 24
    reference, states = run(loader(), 30)  # across the nominal epoch boundary
    for stop in (5, 25):
        resumed = loader()
        resumed.load_state_dict(states[stop])
        got = run(resumed, 30 - stop)[0]
        assert [b["__key__"] for b in got] == [b["__key__"] for b in reference[stop:]]
        assert resumed.num_decoded == len(keys(got))  # nothing before the position decoded
    sd = states[25]
    assert sd["epoch"] == 1 and sd["batch_in_epoch"] == 1 and len(sd["workers"][0]["sources"]) == 2
    assert sd["sources"] == [["cap", 0.7], ["doc", 0.3]]
    problems = TrainLoader(mix_cfg(sources, weights=(0.5, 0.5), num_workers=2), sp_tokenizer, 4, 0, 1,
                           seed=7).resume_problems(sd)
    assert len(problems) == 1 and "data.sources (names and weights, in order: cap=0.7, doc=0.3)" in problems[0]


def test_mixture_on_another_layout_loses_no_sample_of_a_source_epoch(sources, sp_tokenizer):
    # 2 ranks x 2 workers -> 1 rank x 1 worker, early in every slot's first epoch of each source
    stop = 3
    runs = [run(TrainLoader(mix_cfg(sources, num_workers=2), sp_tokenizer, 4, r, 2, seed=7), stop) for r in range(2)]
    before = [k for batches, _ in runs for k in keys(batches)]
    states = [s[stop] for _, s in runs]
    assert all(w["sources"][i]["epoch"] == 0 for s in states for w in s["workers"] for i in range(2))
    one = TrainLoader(mix_cfg(sources, num_workers=1), sp_tokenizer, 4, 0, 1, seed=7)
    one.load_state_dict(states[1], all_ranks=states)
    assert (one.epoch, one.batch_in_epoch) == (0, 2 * stop)
    after = keys(run(one, 40)[0])
    for prefix, size in (("cap", 64), ("doc", 32)):
        seen = [k for k in before if k.startswith(prefix)]
        rest = [k for k in after if k.startswith(prefix)][: size - len(seen)]  # the plan epoch of the source
        assert sorted(seen + rest) == [f"{prefix}{i:09d}" for i in range(size)], prefix  # each once


def test_sources_config(sources, sp_tokenizer):
    tok = f"data.tokenizer={sp_tokenizer.source}"
    spec = [{"name": "cap", "shards": str(sources["cap"]), "weight": 0.7},
            {"name": "doc", "shards": str(sources["doc"]), "weight": 0.3}]
    cfg = load_config(None, ["output_dir=x", f"data.sources={json.dumps(spec)}", tok])
    assert cfg.data.sources == [SourceSpec("cap", str(sources["cap"]), 0.7),
                                SourceSpec("doc", str(sources["doc"]), 0.3)]
    assert not cfg.data.resampled

    bad = [{"name": "cap", "shards": str(sources["cap"]), "weight": 0},
           {"name": "cap", "shards": "nowhere/{000000..000003}.tar", "weight": 1}]
    with pytest.raises(ConfigError) as e:
        load_config(None, ["output_dir=x", f"data.sources={json.dumps(bad)}", tok, "data.train_shards=" +
                           str(sources["cap"])])
    problems = [p for p in e.value.problems if p.startswith("data.sources")]
    assert problems[0].startswith(f"data.sources: given with data.train_shards ({str(sources['cap'])!r}); ")
    assert "data.sources[0].weight: 0.0 must be > 0" in problems[1]
    assert problems[2].startswith("data.sources[1].name: 'cap': every source needs a name of its own")
    assert problems[3].startswith("data.sources[1].shards: ") and "nowhere/{000000..000003}.tar" in problems[3]
    assert "brace pattern" in problems[3]  # the fix
    assert len(problems) == 4
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.wieght: unknown key"):
        load_config(None, ["output_dir=x", 'data.sources=[{"name": "a", "shards": "s", "wieght": 1}]'],
                    check_paths=False)
