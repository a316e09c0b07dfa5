"""The engine: one decoder layer at a time, capture, statistics, solve, measure, propagate.

- :mod:`.capture`: what every layer receives;
- :mod:`.statistics`: fp32 input statistics, one accumulator per distinct input;
- :mod:`.solve`: one linear's solve (joint for linears sharing an input) and write-back;
- :mod:`.error`: each linear's relative output error;
- :mod:`.layer`: the hooks on one layer's linears, with their modes as context managers;
- :mod:`.loop`: the layer-by-layer loop; :mod:`.state`: what a resumed run needs;
- :mod:`.layerio`, :mod:`.batching`, :mod:`.owl`: where layers live, forward batches, OWL's pre-pass.
"""

from .layerio import LayerIO
from .loop import ERROR_TOKENS, prune_layers
from .state import RunState

__all__ = ["ERROR_TOKENS", "LayerIO", "RunState", "prune_layers"]
