"""Several processes (GPUs or CPU workers) through torch.distributed, launched with torchrun.

* Mode 1, images across ranks (``ranks.py``): :func:`run_sharded_ttt` / :func:`run_sharded` spread
  the test images over the ranks, each running the single-device trainer, into one restart-safe
  results file (``results.py``).
* Mode 2, one image's location queries across ranks (``queries.py``): :func:`sharded_forward` and
  :class:`ShardedQueryTrainer` run the one driver over a slice of the L queries per rank and
  combine the pool's softmax exactly across ranks.

``python -m apm_fast.distributed`` runs the self-check of both modes under torchrun.
"""
from .env import init_distributed
from .queries import ShardedQueryTrainer, query_slice, sharded_forward
from .ranks import run_sharded, run_sharded_ttt
from .results import read_records

__all__ = ["init_distributed", "run_sharded", "run_sharded_ttt", "read_records", "ShardedQueryTrainer",
           "sharded_forward", "query_slice"]
