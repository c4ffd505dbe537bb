"""Multi-node runs on a local multi-node Ray cluster (`ray.cluster_utils.Cluster`: a head and 2
worker nodes, all on this machine): batch scoring whose predictor actors run on more than one
node, scoring that loses a node mid-run while another joins, and a 2-worker pretraining run whose
ranks sit on two different nodes.

The jobs connect the way they would to a real cluster (`address=cluster.address`; jobs/ray_env.py
connects and leaves the cluster up). The resource layout forces the spread, and the tests then
observe it rather than assume it:

- head: 1 CPU; each worker node: 3 CPUs. A predictor actor reserves 1.75 CPUs and a Train
  worker 2, so two of either can't share a node and neither fits on the head, while every node
  keeps a CPU or so free for the fractional (0.25) Ray Data read/tokenize tasks of training
  (without that room Ray Data waits forever: pipelines/resources.py).
- Scoring: Ray's state API (`ray.util.state`, served by the head's dashboard) lists the
  predictor actors (`ScoringActor`, pipelines/scoring/units.py) with their node ids, and the units
  they scored with theirs.
- Pretraining: rank 0 writes every rank's Ray node id in the "start" record of metrics.jsonl.

Other engineers' Ray sessions may run on this machine at the same time, so this module never
touches `/tmp/ray/ray_current_cluster`: `Cluster` writes its address there (and deletes that file
on shutdown), and a plain `ray.init()` elsewhere would then join this cluster instead of starting
its own. Timings vary with the machine's load; nothing here asserts on speed.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

HEAD_CPUS, WORKER_CPUS = 1, 3
ACTOR_CPUS = 1.75  # > WORKER_CPUS / 2 and > HEAD_CPUS: one predictor actor per worker node
TRAIN_WORKER_CPUS = 2.0  # likewise: one Train worker per worker node
PREDICTOR = "ScoringActor"  # the state API's class name of the CPU predictor actors
STEPS = 20


@pytest.fixture(scope="module")
def cluster():
    """Head + 2 worker nodes, shared by this module, torn down at its end (even on failure)."""
    import ray
    import ray._common.utils
    import ray._private.utils
    import ray.data
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    ctx = ray.data.DataContext.get_current()
    old_bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    with pytest.MonkeyPatch.context() as mp:
        # Read by the raylets, workers and the Train controller: set before the nodes start.
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.delenv("RAY_ADDRESS", raising=False)
        # Keep this cluster private (see the module docstring).
        mp.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
        mp.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
        from conftest import free_port

        c = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=HEAD_CPUS, include_dashboard=True, dashboard_port=free_port(), object_store_memory=256 << 20))
        try:
            for _ in range(2):
                c.add_node(num_cpus=WORKER_CPUS, object_store_memory=256 << 20)
            c.wait_for_nodes()
            yield c
        finally:
            ray.shutdown()
            c.shutdown()
            ctx.enable_progress_bars = old_bars


def _node_ids(cluster) -> tuple[str, set[str]]:
    """(head node id, worker node ids)."""
    head = cluster.head_node.node_id
    workers = {n.node_id for n in cluster.worker_nodes}
    assert len(workers) == 2 and head not in workers
    return head, workers


def _generated(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = "ray data parquet bert scoring token budget actor pool cluster node head worker shard".split()
    return [" ".join(rng.choice(words, size=int(rng.integers(3, 40)))) for _ in range(n)]


def _poll(fn, ok, timeout: float = 30.0, every: float = 1.0):
    """fn() until ok(value) or timeout (the state API sees task events ~1 s late); the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if ok(value) or time.monotonic() > deadline:
            return value
        time.sleep(every)


@pytest.mark.timeout(300)
def test_scoring_actors_run_on_two_nodes(cluster, minilm_dir, tmp_path):
    from ray.util.state import list_actors, list_tasks

    from jobs.score import ResourceConfig, ScoreConfig, main
    from pipelines.scoring.output import read_output

    head, workers = _node_ids(cluster)
    d = tmp_path / "in"
    d.mkdir()
    texts = _generated(200)
    ids = [f"t{i}" for i in range(len(texts))]
    for k in range(2):  # two files, 100 rows each
        pq.write_table(pa.table({"id": ids[k * 100:(k + 1) * 100], "text": texts[k * 100:(k + 1) * 100]}),
                       d / f"part-{k}.parquet")
    out = tmp_path / "out"
    t0 = time.perf_counter()
    result = main(ScoreConfig(
        input=str(d), output=str(out), model=str(minilm_dir), task="embed", max_length=128,
        batch_size=20,  # units of 2 blocks: 10 units, so both actors get work
        address=cluster.address, resources=ResourceConfig(num_actors=2, actor_num_cpus=ACTOR_CPUS)))
    seconds = time.perf_counter() - t0

    # Every row comes out exactly once.
    table = read_output(str(out))
    assert result.rows == result.input_rows == table.num_rows == 200 and result.error_rows == 0
    assert sorted(table["id"].to_pylist()) == sorted(ids)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert result.plan["num_actors"] == 2 and result.plan["actor_num_cpus"] == ACTOR_CPUS

    # Where the predictor actors ran: one per worker node (the state API keeps dead actors).
    def predictor_actors():
        try:
            return list_actors(address=cluster.address, filters=[("class_name", "=", PREDICTOR)], detail=True,
                               limit=1000, raise_on_missing_output=False)
        except Exception as e:  # the dashboard's API server answering late: try again
            return [e]

    actors = _poll(predictor_actors, lambda a: a and not isinstance(a[0], Exception), timeout=20)
    assert actors and not isinstance(actors[0], Exception), actors
    actor_nodes = {a.actor_id: a.node_id for a in actors}
    assert len(actor_nodes) == 2, actors
    assert set(actor_nodes.values()) == workers, (actor_nodes, workers, head)

    # And both did work: the units (`score` calls) each actor scored, by node (task events
    # reach the state API about a second late, hence the polling).
    def units_per_node():
        try:
            tasks = list_tasks(address=cluster.address, filters=[("type", "=", "ACTOR_TASK")], detail=True,
                               limit=10_000, raise_on_missing_output=False)
        except Exception:
            return {}
        per: dict[str, int] = {}
        for t in tasks:
            if t.actor_id in actor_nodes and t.state == "FINISHED" and t.name.endswith(".score"):
                assert t.node_id == actor_nodes[t.actor_id]
                per[t.node_id] = per.get(t.node_id, 0) + 1
        return per

    per_node = _poll(units_per_node, lambda p: set(p) == workers)
    assert set(per_node) == workers, per_node
    print(f"\nscoring: {result.rows} rows in {seconds:.1f} s; predictor actors on nodes "
          f"{sorted(set(actor_nodes.values()))}; units scored per node {per_node}")


@pytest.mark.timeout(420)
def test_scoring_survives_a_lost_node_and_puts_a_new_one_to_work(cluster, minilm_dir, tmp_path):
    """#36: nodes come and go under a scoring run. It asks for three predictor actors where the two
    worker nodes hold two (the third waits for room, as on an autoscaling cluster). Once the first
    units are written, one worker node is killed outright (its actor and the units it was scoring
    go with it) and a fresh node joins. The run finishes with every row exactly once (the lost
    units are scored again), and the node that joined scored units."""
    import threading

    from ray.util.state import list_tasks

    from jobs.score import ResourceConfig, ScoreConfig, main
    from pipelines.scoring.output import read_output

    head, workers = _node_ids(cluster)
    d, out = tmp_path / "in", tmp_path / "out"
    d.mkdir()
    # Long enough (about 40 s on 2 cores) for the joining node's actor to start and take units.
    texts = _generated(8_000, seed=1)
    ids = [f"n{i}" for i in range(len(texts))]
    for k in range(4):  # four files of 2,000 rows
        pq.write_table(pa.table({"id": ids[k * 2000:(k + 1) * 2000], "text": texts[k * 2000:(k + 1) * 2000]}),
                       d / f"part-{k}.parquet")
    box: dict = {}

    def run():
        try:
            box["result"] = main(ScoreConfig(
                input=str(d), output=str(out), model=str(minilm_dir), task="embed", max_length=128,
                batch_size=20,  # units of 16 blocks of 20 rows (choose_unit_rows): 25 units
                address=cluster.address, resources=ResourceConfig(num_actors=3, actor_num_cpus=ACTOR_CPUS)))
        except BaseException as e:  # re-raised below, in the test's thread
            box["error"] = e

    job = threading.Thread(target=run, daemon=True)
    job.start()
    units = lambda: list(out.rglob("*.parquet")) if out.is_dir() else []  # noqa: E731
    _poll(units, lambda u: len(u) >= 2 or not job.is_alive(), timeout=240, every=0.2)
    assert job.is_alive() and len(units()) < 25, "the run ended before a node could be lost"
    lost = next(n for n in cluster.worker_nodes if n.node_id in workers)
    cluster.remove_node(lost, allow_graceful=False)
    new = cluster.add_node(num_cpus=WORKER_CPUS, object_store_memory=256 << 20)
    job.join(timeout=300)
    assert not job.is_alive(), "scoring hung after losing a node"
    if "error" in box:
        raise box["error"]
    result = box["result"]

    table = read_output(str(out))
    assert result.rows == result.input_rows == table.num_rows == len(ids) and result.error_rows == 0
    assert sorted(table["id"].to_pylist()) == sorted(ids)  # every row once: none lost, none twice

    def units_on_new_node():
        try:
            tasks = list_tasks(address=cluster.address, filters=[("type", "=", "ACTOR_TASK")], detail=True,
                               limit=10_000, raise_on_missing_output=False)
        except Exception:
            return 0
        return sum(t.node_id == new.node_id and t.state == "FINISHED" and t.name.endswith(".score") for t in tasks)

    assert _poll(units_on_new_node, lambda n: n > 0) > 0, "the node that joined mid-run scored nothing"


# Over 60 s: a Ray Train fit whose workers start on two other nodes of a 3-node test cluster.
@pytest.mark.timeout(300)
def test_pretraining_ranks_on_two_nodes(cluster, tmp_path):
    from jobs.pretrain import main, preset_config, read_metrics
    from pipelines.corpora import chinese_vocab_path, peoples_daily_sentences
    from pipelines.training.pretrain_data import write_corpus

    head, workers = _node_ids(cluster)
    corpus = write_corpus(peoples_daily_sentences()[:400], str(tmp_path / "zh"), rows_per_file=200)
    cfg = preset_config("debug")
    cfg.run_dir = str(tmp_path / "run")
    cfg.address = cluster.address
    cfg.data.paths = [corpus]
    cfg.data.tokenizer = str(chinese_vocab_path())
    cfg.scaling.num_workers = 2
    cfg.scaling.cpus_per_worker = TRAIN_WORKER_CPUS
    cfg.scaling.max_failures = 0
    t = cfg.train
    t.max_steps, t.zero_stage, t.dtype = STEPS, 2, "fp32"
    t.lr, t.warmup_steps, t.log_every, t.eval_every, t.save_every = 3e-3, 5, 5, STEPS, STEPS
    t0 = time.perf_counter()
    result = main(cfg)
    seconds = time.perf_counter() - t0

    records = read_metrics(cfg.run_dir)
    start = records[0]
    assert start["event"] == "start" and start["world_size"] == 2
    nodes = start["nodes"]  # Ray node id of rank 0, rank 1
    assert len(nodes) == 2 and len(set(nodes)) == 2 and set(nodes) == workers, (nodes, workers, head)

    assert result.metrics["step"] == STEPS and result.checkpoint is not None
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == list(range(5, STEPS + 1, 5))
    first, last = losses[5], losses[STEPS]
    assert all(math.isfinite(v) for v in losses.values())
    assert abs(first - math.log(21128)) < 1.0 and last < first - 0.5, losses
    print(f"\npretraining: {STEPS} steps in {seconds:.1f} s; rank nodes {nodes}; loss {first:.2f} -> {last:.2f}")
