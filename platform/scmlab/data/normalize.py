"""Model space <-> data space, from the manifest.

Images are already in model space as decoded: pixels in [-1, 1], whose std is close to the paper's sigma_d = 0.5.
Vectors are stored in original units and scaled per dimension to std sigma_d: to_model(x) = (x - mean) / std * sigma_d,
so the data matches the noise scale z ~ N(0, sigma_d^2 I) that TrigFlow assumes; to_data inverts it for samples.
"""

import numpy as np
import torch


class Normalizer:
    def __init__(self, manifest: dict):
        self.kind = manifest["kind"]
        self.sigma_d = float(manifest["sigma_d"])
        self.mean = torch.tensor(manifest["stats"]["mean"], dtype=torch.float64)
        std = np.asarray(manifest["stats"]["std"], dtype=np.float64)
        self.std = torch.from_numpy(np.where(std > 0, std, 1.0))  # a constant dimension stays at 0, not inf

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean.to(x.device, x.dtype), self.std.to(x.device, x.dtype)

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) vectors in original units -> model space; images pass through."""
        if self.kind == "image":
            return x
        mean, std = self._stats(x)
        return (x - mean) / std * self.sigma_d

    def to_data(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of to_model: model-space samples -> original units (images stay in [-1, 1])."""
        if self.kind == "image":
            return x
        mean, std = self._stats(x)
        return x / self.sigma_d * std + mean
