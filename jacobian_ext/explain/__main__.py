"""python -m jacobian_ext.explain --demo OUT.png: draws the demo picture (see demo.py)."""
import argparse

from .demo import draw


def main():
    parser = argparse.ArgumentParser(prog="python -m jacobian_ext.explain", description=__doc__)
    parser.add_argument("--demo", metavar="OUT.png", required=True,
                        help="train a small CNN on synthetic bars and draw its per-class attribution maps to OUT.png")
    parser.add_argument("--steps", type=int, default=600, help="training steps (default 600, a few seconds)")
    arguments = parser.parse_args()
    print(f"wrote {draw(arguments.demo, arguments.steps)}")


if __name__ == "__main__":
    main()
