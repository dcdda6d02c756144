"""Phase 3 - memory continuity: the thinking state is carried from chunk to chunk, with gradients through it.

python recipes/phase3_continuity.py --preset tiny --output runs/tiny [--from runs/tiny/phase2-thinking/model]
"""

from modeling_ctm.training.runs import phase_cli


def main(argv=None):
    phase_cli(3, __doc__, argv)


if __name__ == "__main__":
    main()
