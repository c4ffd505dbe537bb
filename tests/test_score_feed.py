"""Scoring with the tokenizing apart (pipelines/scoring/feed.py), the GPU layout, run here with CPU
actors standing in for the GPU ones: every unit is scored once and exactly as a predictor that
tokenizes its own units scores it; an autoscaling pool asks for its other actors once one has
started and scores on those that start; a unit a tokenizing actor can't read stops the run naming
its rows. (Device cuda on a cluster without GPUs: tests/test_score_autoscale.py.)"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from pipelines.resources import CpuPlan
from pipelines.scoring.feed import PredictorPool, default_tokenizers, run_fed_units, start_tokenizers
from pipelines.scoring.unit_plan import UnitSpec, plan_units
from pipelines.scoring.units import run_units, stop_actors
from test_score_units import _file, _spec


def _fed_spec(tmp_path, model, out) -> UnitSpec:
    spec = _spec(tmp_path, model)
    return replace(spec, output=str(out), predictor_kwargs=dict(spec.predictor_kwargs, tokenize=None))


def _plan(num_actors: int, cpus: float, min_actors=None) -> CpuPlan:
    return CpuPlan(num_actors, cpus, 0.0, 0.25, 1, "cpu", min_actors=min_actors)


def _run(pool: PredictorPool, n_tokenizers: int, units, spec, slow_driver_s: float = 0.0) -> list:
    tokenizers, done = [], []

    def on_done(rows, errors, tokens):
        done.append(rows)
        time.sleep(slow_driver_s)  # a driver busy elsewhere (a slow progress line, a loaded node)

    try:
        pool.start()
        start_tokenizers(tokenizers, n_tokenizers, 1, 1)
        run_fed_units(pool, tokenizers, units, spec, on_done)
    finally:
        stop_actors(pool.actors + tokenizers)
    return done


def test_tokenized_units_score_once_and_as_a_self_tokenizing_actor_scores_them(ray_local, tmp_path, tiny):
    f = str(tmp_path / "a.parquet")
    _file(f, 300, 100)
    units = plan_units([f], [f], 40)
    fed, own = tmp_path / "fed", tmp_path / "own"
    fed.mkdir(), own.mkdir()
    done = _run(PredictorPool(_plan(1, 1.0), 1, 1), 1, units, _fed_spec(tmp_path, tiny, fed))
    assert sorted(done) == sorted(u.rows for u in units) and sorted(os.listdir(fed)) == sorted(u.name for u in units)

    pool = PredictorPool(_plan(1, 1.0), 1, 1)
    pool.start()
    try:
        run_units(pool.actors, units, replace(_spec(tmp_path, tiny), output=str(own)), lambda *counts: None)
    finally:
        stop_actors(pool.actors)
    for u in units:
        assert pq.read_table(fed / u.name).equals(pq.read_table(own / u.name)), u.name


def test_an_autoscaling_pool_asks_for_more_once_one_starts_and_uses_those_that_start(ray_local, tmp_path, tiny):
    f = str(tmp_path / "a.parquet")
    _file(f, 240, 240)
    units = plan_units([f], [f], 20)  # 12 units: up to 3 actors at UNITS_PER_ACTOR 4
    (tmp_path / "out").mkdir()
    # 3 predictors of 0.75 CPU and a 1-CPU tokenizer on 2 CPUs: at most one predictor is placed.
    pool = PredictorPool(_plan(3, 0.75, min_actors=1), 1, 1)
    done = _run(pool, 1, units, _fed_spec(tmp_path, tiny, tmp_path / "out"))
    assert len(pool.actors) == 3  # asked for: 1 at first, the rest once it had started
    assert sum(done) == 240 and sorted(os.listdir(tmp_path / "out")) == sorted(u.name for u in units)


def test_a_unit_a_tokenizer_cannot_read_stops_the_run_naming_its_rows(ray_local, tmp_path, tiny):
    from pipelines.scoring.units import UnitFailed

    f = str(tmp_path / "a.parquet")
    _file(f, 60, 30)
    units = plan_units([f], [f], 30)
    os.remove(f)  # vanished after planning
    (tmp_path / "out").mkdir()
    with pytest.raises(UnitFailed, match=r"a.parquet: rows \d+-\d+ \(row group \d\) could not be read.*rerun"):
        _run(PredictorPool(_plan(1, 1.0), 0, 0), 1, units, _fed_spec(tmp_path, tiny, tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []


def test_gpu_plans_tokenize_on_the_cpus_their_actors_leave():
    gpu = CpuPlan(2, 1.0, 1.0, 0.25, 1, "cuda")
    assert default_tokenizers(gpu, free_cpus=32, free_gpus=2) == 30
    assert default_tokenizers(CpuPlan(8, 1.0, 1.0, 0.25, 1, "cuda", min_actors=1), 16, 0) == 16  # no GPU node yet
    assert default_tokenizers(gpu, free_cpus=2, free_gpus=2) == 1  # at least one
    assert default_tokenizers(CpuPlan(2, 1.0, 0.0, 0.25, 1, "cpu"), 2, 0) == 0  # CPU actors tokenize their own


def test_gpu_actors_are_never_left_to_tokenize_their_own_units(ray_local, tmp_path, tiny):
    import pyarrow as pa

    from pipelines.scoring.config import ResourceConfig, ScoreConfig
    from pipelines.scoring.job import score

    pq.write_table(pa.table({"id": ["a"], "text": ["hello"]}), tmp_path / "in.parquet")
    cfg = ScoreConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model=tiny,
                      resources=ResourceConfig(device="cuda", tokenizer_actors=0))
    with pytest.raises(ValueError, match="tokenizer_actors 0 .* a GPU actor must not"):
        score(cfg)
    assert not (tmp_path / "out").exists()  # refused before the output was touched


def test_a_slow_driver_still_scores_every_unit(ray_local, tmp_path, tiny):
    """With one tokenizer and one predictor, a driver that handles completions late sees units
    scored before it saw their tables done: the tokenizer's slots must be freed either way (the run
    used to end with units never handed out)."""
    f = str(tmp_path / "a.parquet")
    _file(f, 160, 160)
    units = plan_units([f], [f], 20)  # 8 units
    (tmp_path / "out").mkdir()
    done = _run(PredictorPool(_plan(1, 1.0), 1, 1), 1, units, _fed_spec(tmp_path, tiny, tmp_path / "out"),
                slow_driver_s=0.3)
    assert sum(done) == 160 and sorted(os.listdir(tmp_path / "out")) == sorted(u.name for u in units)


def test_a_fixed_gpu_pool_that_cannot_start_says_so_in_one_line(ray_local):
    from pipelines.scoring.config import ActorsLost

    fixed = PredictorPool(CpuPlan(2, 1.0, 1.0, 0.25, 1, "cuda"), 1, 1)  # GPUs were there at plan time
    error = fixed.lost()
    assert isinstance(error, ActorsLost)
    assert "no predictor actor started within 300 s: the cluster has 0 of 0 GPUs free" in str(error)
    assert "--num-actors lower" in str(error)


def test_tokenizing_actors_that_cannot_fit_beside_cpu_predictors_are_refused(ray_local, tmp_path, tiny):
    import pyarrow as pa

    from pipelines.scoring.config import ResourceConfig, ScoreConfig
    from pipelines.scoring.job import score

    pq.write_table(pa.table({"id": ["a"], "text": ["hello"]}), tmp_path / "in.parquet")
    cfg = ScoreConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model=tiny,
                      resources=ResourceConfig(device="cpu", num_actors=2, tokenizer_actors=1))
    with pytest.raises(ValueError, match="tokenizer_actors 1 .* 2 predictor actors of 1 CPU need more than the Ray "
                                         "cluster's 2 CPUs"):
        score(cfg)


def test_a_tokenizer_that_does_not_load_names_it(tmp_path, tiny):
    from pipelines.scoring.units import NotLoaded, ScoringActor

    f = str(tmp_path / "a.parquet")
    _file(f, 10, 10)
    spec = _fed_spec(tmp_path, tiny, tmp_path / "out")
    spec = replace(spec, tokenize=dict(spec.tokenize, tokenizer_path=str(tmp_path / "gone")))
    with pytest.raises(NotLoaded, match="gone: the tokenizer did not load on a tokenizing actor"):
        ScoringActor(1, load_torch=False).tokenize(plan_units([f], [f], 10)[0], spec)
