# Rank 1 raises inside a torch `@record` main, so its error file holds the traceback.
import os
import warnings

warnings.filterwarnings("ignore")
from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402


def load_batch(rank):
    raise ValueError(f"corrupt shard for rank {rank}")


@record
def main():
    rank = int(os.environ["RANK"])
    if rank == 1:
        load_batch(rank)


main()
