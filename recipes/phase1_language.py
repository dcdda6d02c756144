"""Phase 1 - language: a plain transformer (no thinking layers) learns the language at full speed.

python recipes/phase1_language.py --preset tiny --output runs/tiny
"""

from modeling_ctm.training.runs import phase_cli


def main(argv=None):
    phase_cli(1, __doc__, argv)


if __name__ == "__main__":
    main()
