"""What the Colab notebooks compute, as tested library functions.

The notebooks in ``colab/`` stay thin: every line that does more than call a function lives
here, in three modules re-exported by this package (``analysis.X`` works for all):

- set-up: :func:`notebook_overrides` (tiny sizes under ``ONN_JAX_NOTEBOOK_TINY=1``, the
  few-minute CPU sizes otherwise) and :func:`load_config` (a config shipped with the package,
  by name, or a YAML path);
- free running: :func:`task_batch` serialises tasks the way training does,
  :func:`rollouts` decodes every answer from its prompt (greedy, or EAVI's excursion feed),
  :func:`summarise_rollouts` / :func:`free_running_exact_match` score them and
  :func:`render_rollouts` draws them next to the targets;
- routing: :func:`grid_positions` maps each token to its (row, col) inside its grid,
  :func:`routing_table` counts, from the experts that each DynMoE layer sows as
  ``intermediates/used_experts``, which experts fire on which token ids and grid cells,
  :func:`plot_routing` draws that;
- runs: :func:`expert_history` reads expert activity and reset events from a metrics.jsonl,
  :func:`format_table` prints records, :func:`show` displays PNG files inline.
"""

from onn_jax.analysis.setup import (  # noqa: F401
    TINY_ENV,
    NOTEBOOKS,
    TINY_OVERRIDES,
    NOTEBOOK_SIZES,
    is_tiny,
    notebook_overrides,
    load_config,
    show,
    draw_tasks,
    format_table,
    task_batch,
)
from onn_jax.analysis.rollouts import (  # noqa: F401
    answer_targets,
    score_rollouts,
    answer_text,
    rollouts,
    free_running_exact_match,
    summarise_rollouts,
    render_rollouts,
)
from onn_jax.analysis.routing import (  # noqa: F401
    grid_positions,
    used_experts,
    RoutingTable,
    routing_table,
    plot_routing,
    expert_history,
)
