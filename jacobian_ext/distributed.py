"""The processes of a torchrun job, for jacobians_to_disk: rank, world size, barriers, and a check that
every rank runs the same job. A single process is world size 1 and needs no torch.distributed."""
import os

import torch
import torch.distributed as dist


class Ranks:
    """Joins the process group torchrun set up: an initialised one is used as it is; with torchrun's
    RANK and WORLD_SIZE set but no group yet, one is created here (nccl for a CUDA model, gloo
    otherwise) and destroyed by close()."""

    def __init__(self, device: torch.device):
        self.owns_group = False
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            return
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
            if not dist.is_available():
                raise RuntimeError("WORLD_SIZE is set (torchrun) but this torch has no torch.distributed")
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo")
            self.owns_group = True
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            return
        self.rank, self.world_size = 0, 1

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def check_same(self, value, what: str):
        """Raises on every rank when the ranks disagree on `value` (a JSON-able description of the job)."""
        if self.world_size == 1:
            return
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        differing = [rank for rank, other in enumerate(values) if other != values[0]]
        if differing:
            raise ValueError(f"ranks {differing} run another {what} than rank 0: every rank must pass the same "
                             "model (same weights), data and options")

    def close(self):
        if self.owns_group:
            dist.destroy_process_group()
            self.owns_group = False
