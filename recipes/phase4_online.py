"""Phase 4 - online learning: the phase-3 model lives through scripted conversations over held-out text with its
memory stack on (episodic recall and store, Hebbian edits, sleep), then is evaluated and saved like phases 1-3, with
its brain (episodic memory, plasticity anchors, replay heap) beside the checkpoint.

python recipes/phase4_online.py --preset tiny --output runs/tiny [--from runs/tiny/phase3-continuity/model]
"""

from modeling_ctm.training.runs import phase_cli


def main(argv=None):
    phase_cli(4, __doc__, argv)


if __name__ == "__main__":
    main()
