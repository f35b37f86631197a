"""Seen in session 44 (2026-12-07, jax 0.10.2, XLA:CPU, a 2-core AMD EPYC; default flags): the
teacher-forcing step of the suite's tiny model at ``num_layers=1``, jitted with the training
state closed over (a constant of the program) rather than passed in, reports a gradient norm
that changes from process to process (2.3408 or 2.34074 in four of twelve fresh processes; inf,
nan, 1.7e6, 1.3e16 or 4.1e18 in the others: the step is then skipped as non-finite), where the
gradients alone, the same step with the state passed as an argument (as ``run.train`` calls it)
and the packed batch's step give 2.3408 every time. At num_layers=2 the closed-over step gave
the right norm in every run. Not pinned down. Run a few times from the repository's root:
``JAX_PLATFORMS=cpu python docs/bench/xla_cpu_closed_over_state_grad_norm.py``."""
import sys

import jax

sys.path.insert(0, "tests")
from conftest import tiny_config  # noqa: E402

from onn_jax import steps  # noqa: E402
from onn_jax.data.pipeline import BatchStream, build_training_tasks, collate  # noqa: E402
from onn_jax.model import attention  # noqa: E402
from onn_jax.model.transformer import Transformer  # noqa: E402

cfg = tiny_config(data=dict(pack=True), model=dict(num_layers=1))
tasks, _ = build_training_tasks(cfg.data, log=lambda *_: None)
stream = BatchStream(tasks, cfg.data, cfg.train.batch_size, 0,
                     pack_align=attention.pack_alignment(cfg.model))
rows = [row for row in stream.pack_rows(1) if len(row) > 1][:2]
batch = collate([ex for row in rows for ex in row], cfg.data.buckets[-1])
model = Transformer(cfg.model)
state = steps.init_state(cfg, model, jax.random.PRNGKey(0))
closed = jax.jit(lambda b: steps.train_step(state, b, model=model, cfg=cfg))(batch)[1]
passed = jax.jit(lambda s, b: steps.train_step(s, b, model=model, cfg=cfg))(state, batch)[1]
print(jax.__version__, "grad_norm, state closed over:", float(closed["grad_norm"]),
      "| passed in:", float(passed["grad_norm"]))
