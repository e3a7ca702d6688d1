"""``ftbench estimate``: the memory breakdown of a training step for any model, without its weights.

* :mod:`~ftbench.estimate.meta` - the model from its config alone on the meta device (checked to be a
  real model's size first), quantized as a load quantizes it, and the kernels and autocast casts a
  real device makes that meta does not;
* :mod:`~ftbench.estimate.run` - :class:`MetaRun` and :func:`estimate`: one step of the objective on a
  full batch, read by the same functions :class:`ftbench.bench.memory.MemoryBreakdown` uses on a run;
* :mod:`~ftbench.estimate.options` - optimizer names, tuner and objective configs, sizes;
* :mod:`~ftbench.estimate.table`, :mod:`~ftbench.estimate.cli` - the rows, the command line.
"""

from ftbench.errors import EstimateError
from ftbench.estimate.cli import main
from ftbench.estimate.meta import MetaKernels, meta_model, read_config, sized_config
from ftbench.estimate.options import instantiate_config, optimizer_factory, parse_bytes
from ftbench.estimate.run import MetaRun, estimate
from ftbench.estimate.table import table

__all__ = ["EstimateError", "MetaKernels", "MetaRun", "estimate", "instantiate_config", "main", "meta_model",
           "optimizer_factory", "parse_bytes", "read_config", "sized_config", "table"]
