"""Several processes (GPUs or CPU workers) through torch.distributed, launched with torchrun.

* Mode 1, images across ranks (``ranks.py``): :func:`run_sharded_ttt` / :func:`run_sharded` spread
  the test images over the ranks, each running the single-device trainer, into one restart-safe
  results file (``results.py``).
* Mode 2, one image's location queries across ranks (``queries.py``): :func:`sharded_forward` and
  :class:`ShardedQueryTrainer` run the one driver over a slice of the L queries per rank and
  combine the pool's softmax exactly across ranks.

``python -m apm_fast.distributed`` runs the self-check of both modes under torchrun.
"""
from .env import DistInfo, init_distributed, launched_world_size, rank_and_world
from .queries import QueryShards, ShardedOutput, ShardedQueryTrainer, broadcast_parameters, query_slice, sharded_forward
from .ranks import ShardedRun, input_keys, run_sharded, run_sharded_ttt, shard_indices
from .results import part_path, parts_dir, read_records

__all__ = ["DistInfo", "init_distributed", "launched_world_size", "rank_and_world", "ShardedRun",
           "input_keys", "run_sharded", "run_sharded_ttt", "shard_indices", "QueryShards", "ShardedOutput",
           "ShardedQueryTrainer", "broadcast_parameters", "query_slice", "sharded_forward", "part_path",
           "parts_dir", "read_records"]
