"""Phase 2 - thinking: CTM blocks replace the chosen MLPs of a phase-1 model; everything else is frozen.

python recipes/phase2_thinking.py --preset tiny --output runs/tiny [--from runs/tiny/phase1-language/model]
"""

from modeling_ctm.training.runs import phase_cli


def main(argv=None):
    phase_cli(2, __doc__, argv)


if __name__ == "__main__":
    main()
