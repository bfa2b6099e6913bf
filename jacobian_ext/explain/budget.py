"""How many (input, class) rows of a Jacobian one call may compute: Captum's internal_batch_size where
given, otherwise as many as fit a fraction of the memory available now."""
import os
import warnings

import torch

# Of the memory available at the call: the rows' Jacobian blocks, the scaled inputs and the sweep's
# intermediate blocks (about as large as the Jacobian again) must fit in it.
MEMORY_FRACTION = 0.25
WORKING_COPIES = 3


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on Linux: assume a modest machine
        return 4 << 30


def rows_per_call(total_rows: int, batch: int, bytes_per_row: int, device: torch.device,
                  internal_batch_size=None) -> int:
    """Rows (points x samples, e.g. integration steps x batch) per model call, at least 1.
    internal_batch_size has Captum's meaning: at most that many points per call, whole steps of the batch
    (so at least the batch, with Captum's warning when it asks for less)."""
    if internal_batch_size is not None:
        if isinstance(internal_batch_size, bool) or not isinstance(internal_batch_size, int) or internal_batch_size < 1:
            raise ValueError(f"internal_batch_size must be a positive int or None, got {internal_batch_size!r}")
        if internal_batch_size < batch:
            warnings.warn(f"internal_batch_size {internal_batch_size} is below the number of examples {batch}; "
                          f"using {batch} (one step of the whole batch per call), as Captum does", stacklevel=3)
        return max(1, internal_batch_size // max(batch, 1)) * max(batch, 1)
    budget = MEMORY_FRACTION * available_bytes(device)
    return int(max(1, min(total_rows, budget // max(1, WORKING_COPIES * bytes_per_row))))
