"""Run by test_loader under torchrun: each rank reads its shard through a DataLoader with
2 workers; rank 0 writes the seq_ids every rank saw, as {rank: [seq_id, ...]}."""

import json
import sys

import torch.distributed as dist
from torch.utils.data import DataLoader

from bfpack_spark.loader import PackedSequences, collate


def main(root: str, result: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dataset = PackedSequences(root, rank=rank, world_size=world, seed=11)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate)
    seen = [i for batch in loader for i in batch["seq_id"].tolist()]
    everyone = [None] * world
    dist.all_gather_object(everyone, seen)
    if rank == 0:
        with open(result, "w") as fh:
            json.dump({str(r): ids for r, ids in enumerate(everyone)}, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
