"""FedDiffuse hub: the HTTP service an admin runs to coordinate federated rounds."""

__all__: list[str] = []
