"""FedDiffuse core: the model, the diffusion maths, the federated methods and aggregation,
data and partitions, the wire format, the training loop and the simulator.

Import from the submodules (``feddiffuse.shared.model``, ``.diffusion``, ``.methods``,
``.aggregation``, ``.rounds``, ``.wire``, ``.ledger``, ``.data``, ``.training``,
``.simulate``); this package keeps its own namespace small so that importing it is cheap.
"""

__all__: list[str] = []
