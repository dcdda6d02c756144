"""The performance benchmarks' parts, split by job (imported by eval/benchmark_performance.py and
eval/benchmark_decode.py, which run as scripts and so find this package next to them):

* `shapes`: the same-shape Llama/CTM decoder fields (`llama_intermediate_size`, `same_shape_fields`), the model specs
  of a shape and building them;
* `measure`: timing and memory of a training step, and cached decode latency (`cached_decode`, the one home of it);
* `attribute`: one profiled training step, every op's self time attributed to the model piece that ran it;
* `report`: the markdown tables and the plot.

The shared-machine helpers (`MachineLoad`, `PeakRSS`, `QUIET`) live in `machine` (eval/machine.py).
"""
