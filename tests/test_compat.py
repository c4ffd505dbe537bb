"""pipelines/compat.py: each workaround for a library behaviour still applies (the behaviour is
still there, so the workaround is needed, and the workaround still works). When an upgrade removes
the behaviour, the first assertion of its test fails and says the workaround can go."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_trainer_runs_without_ray_train_placement_group_cleaner(tmp_path):
    """Ray 2.60's cleaner removed a live run's placement group on an empty state-API lookup under
    load (two CI failures: "Destroying worker since its placement group was removed"); our trainer
    leaves it out and keeps every other default callback."""
    from ray.train.torch import TorchTrainer

    from pipelines.trainer import torch_trainer

    trainer = torch_trainer(print, {}, run_dir=tmp_path / "run", num_workers=1, use_gpu=False, cpus_per_worker=1.0,
                            max_failures=0, keep_last=1, datasets={})
    ours = [type(c).__name__ for c in trainer._create_default_callbacks()]
    ray_default = [type(c).__name__ for c in TorchTrainer._create_default_callbacks(trainer)]
    assert "PlacementGroupCleanerCallback" in ray_default and "PlacementGroupCleanerCallback" not in ours
    assert ours == [c for c in ray_default if c != "PlacementGroupCleanerCallback"]


def test_deepspeed_loads_without_importing_mlflow():
    """DeepSpeed 0.19's autotuner imports MLflow when it is installed: most of `import deepspeed`,
    paid by every training worker. import_deepspeed hides MLflow while DeepSpeed loads (the
    autotuner goes without), and MLflow still imports afterwards for raybert's tracker. When a
    DeepSpeed upgrade drops that import, the first assertion says the workaround can go."""
    import importlib.util
    import subprocess
    import sys

    (pkg,) = importlib.util.find_spec("deepspeed").submodule_search_locations
    assert "import mlflow" in Path(pkg, "autotuning", "autotuner.py").read_text()
    code = ("import sys; from pipelines.compat import import_deepspeed; ds = import_deepspeed(); "
            "assert 'mlflow' not in sys.modules and ds.autotuning.autotuner.has_mlflow is False; "
            "import mlflow; print('mlflow', mlflow.__version__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "mlflow " in out.stdout, out.stdout + out.stderr


def test_deepspeed_comm_ops_are_not_jit_built():
    """DeepSpeed 0.19 probes (and may JIT-build) its shm/ccl comm ops the first time
    `deepspeed.ops.__compatible_ops__` is read, from deepspeed/comm: ~30 s and 1.5 GB on CPU.
    disable_deepspeed_jit fills the dict first, so the probe never runs."""
    (pkg,) = importlib.util.find_spec("deepspeed").submodule_search_locations
    assert "_probe_compatible_ops()" in Path(pkg, "ops", "__init__.py").read_text()  # still lazy and probing
    assert "__compatible_ops__" in Path(pkg, "comm", "torch.py").read_text()  # still read by comm
    code = ("import deepspeed.ops as ops\n"
            "ops._probe_compatible_ops = lambda: (_ for _ in ()).throw(AssertionError('probed'))\n"
            "from pipelines.compat import disable_deepspeed_jit; disable_deepspeed_jit()\n"
            "assert ops.__compatible_ops__['deepspeed_shm_comm'] is False and ops.__compatible_ops__['deepspeed_ccl_comm'] is False\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr


def test_ray_jobs_errors_still_carry_the_status_only_in_their_text():
    """The Ray Jobs client raises RuntimeError("Request failed with status code N: ...") with no
    status attribute; http_status reads N back. When Ray gives the error a type or a status, the
    first assertion fails and http_status can go."""
    import inspect

    from ray.dashboard.modules.dashboard_sdk import SubmissionClient

    from pipelines.compat import http_status

    assert 'RuntimeError(\n            f"Request failed with status code {r.status_code}' in inspect.getsource(
        SubmissionClient._raise_error)
    assert http_status(RuntimeError("Request failed with status code 404: Job not found.")) == 404
    assert http_status(RuntimeError("Failed to connect")) is None

