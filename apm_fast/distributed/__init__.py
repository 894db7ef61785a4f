"""Several processes (GPUs or CPU workers) through torch.distributed, launched with torchrun.

* Mode 1, images across ranks: :func:`run_sharded_ttt` / :func:`run_sharded` spread the test
  images over the ranks, each running the single-device engine, into one restart-safe results
  file.
* Mode 2, one image's location queries across ranks: :func:`sharded_forward` and
  :class:`ShardedQueryTrainer` evaluate a slice of the L queries per rank and combine the pool's
  softmax exactly across ranks.

``python -m apm_fast.distributed`` runs the self-check of both modes under torchrun.
"""
from .env import DistInfo, init_distributed, launched_world_size, rank_and_world
from .images import ShardedRun, input_keys, run_sharded, run_sharded_ttt, shard_indices, ttt_record
from .queries import (ShardedOutput, ShardedQueryTrainer, all_reduce_sum, broadcast_parameters,
                      query_slice, sharded_forward, sharded_loss_and_grads,
                      sharded_single_query_pool)
from .results import part_path, parts_dir, read_records

__all__ = ["DistInfo", "init_distributed", "launched_world_size", "rank_and_world", "ShardedRun",
           "input_keys", "run_sharded", "run_sharded_ttt", "shard_indices", "ttt_record",
           "ShardedOutput", "ShardedQueryTrainer", "all_reduce_sum", "broadcast_parameters",
           "query_slice", "sharded_forward", "sharded_loss_and_grads",
           "sharded_single_query_pool", "part_path", "parts_dir", "read_records"]
