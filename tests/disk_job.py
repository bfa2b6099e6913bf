"""A jacobians_to_disk job run as its own process by test_disk.py: killed part-way (resume test) or
under torchrun (distributed test). Each rank logs the samples it loads to fetched_rank<r>.txt."""
import argparse
import os
import signal

import torch
from torch import nn
from torch.utils.data import Dataset

import jacobian_ext as jx

SAMPLES, BATCH_SIZE = 45, 8


def model_and_data():
    generator = torch.Generator().manual_seed(1234)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    return model, torch.randn(SAMPLES, 6, generator=generator, dtype=torch.float64)


class LoggedSamples(Dataset):
    """(x, label) items; logs every index it serves, and kills its process at index kill_at."""

    def __init__(self, data, log_path, kill_at=None):
        self.data, self.log_path, self.kill_at = data, log_path, kill_at

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        if index == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        with open(self.log_path, "a") as log:
            log.write(f"{index}\n")
        return self.data[index], 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--kill-at", type=int, default=None)
    args = parser.parse_args()
    model, data = model_and_data()
    rank = os.environ.get("RANK", "0")
    samples = LoggedSamples(data, os.path.join(args.out_dir, "..", f"fetched_rank{rank}.txt"), args.kill_at)
    jx.jacobians_to_disk(model, samples, args.out_dir, batch_size=BATCH_SIZE, progress=False)


if __name__ == "__main__":
    main()
