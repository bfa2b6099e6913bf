"""Benchmark suite for jacobian_ext (GUIDE.md section 4): times ours against the usual peers,
next to the FLOP and output-bytes floors of this machine. Run `python -m bench --help`."""
