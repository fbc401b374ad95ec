"""FedDiffuse edge client: the data owner's app that joins a federation."""

__all__: list[str] = []
