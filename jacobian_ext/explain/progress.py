"""Progress of a long attribution (many chunks): quiet unless the chunks done so far predict a long run,
then a tqdm bar when tqdm is installed, else one line per chunk on stderr."""
import sys
import time

# Shown once the chunks done so far predict a total run above this.
SHOW_AFTER_PREDICTED_S = 5.0


class Progress:
    """enabled: None decides by the predicted time, True always shows, False never."""

    def __init__(self, total: int, description: str, enabled=None):
        self.total, self.description, self.enabled = total, description, enabled
        self.done, self.start = 0, time.perf_counter()
        self._bar = None

    def update(self, count: int = 1):
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif self.enabled is not False and self.done < self.total:
            elapsed = time.perf_counter() - self.start
            if self.enabled or elapsed / self.done * self.total > SHOW_AFTER_PREDICTED_S:
                self._bar = _open_bar(self.total, self.done, self.description)
        if self.done >= self.total and self._bar is not None:
            self._bar.close()


def _open_bar(total: int, done: int, description: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _StderrLines(total, done, description)
    return tqdm(total=total, initial=done, desc=description, file=sys.stderr)


class _StderrLines:
    def __init__(self, total, done, description):
        self.total, self.done, self.description = total, done, description
        self._print()

    def update(self, count):
        self.done += count
        self._print()

    def _print(self):
        print(f"{self.description}: {self.done}/{self.total} chunks", file=sys.stderr, flush=True)

    def close(self):
        pass
