"""The main job: train the phases 1 -> 2 -> 3, then live phase 4 (online learning, when the preset has a `phase4`
section), evaluate each on held-out text, write samples, model cards and a summary table into one run folder.

    python recipes/run_all.py --preset tiny --output runs/tiny [--push-to-hub NAMESPACE/NAME]

The same as `ctm train` (`--set KEY.PATH=VALUE` overrides a preset value): the work lives in `modeling_ctm.training.main_job`
(summary) and the recipe classes of `modeling_ctm.training.phases`.
"""

import argparse

from modeling_ctm.training.main_job import main_job_from_args, main_job_parser


def main(argv=None):
    parser = main_job_parser(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    main_job_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
