"""Hypothesis profiles, chosen with HYPOTHESIS_PROFILE (default "ci").

- "ci" (`make test`): a fixed, derandomized set of examples (the same on every run, so CI never flakes
  on a new draw), about 2 minutes on 2 cores in all.
- "fuzz" (`make fuzz`): thousands of fresh examples per property; failures are saved in
  .hypothesis/ and replayed first on the next run, and each failure prints a @reproduce_failure blob.
Both run without a per-example deadline: the wide models legitimately take seconds.
"""
import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=120, derandomize=True, database=None, **_COMMON)
settings.register_profile("fuzz", max_examples=3000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
