"""The final EMA weights as an MLflow pyfunc model: `mlflow.pyfunc.load_model(uri).predict(noise)` samples.

A "model from code": MLflow stores this file with the model and runs it to load it (so its imports are absolute),
plus one artifact, a training checkpoint (state dicts and the resolved config, read with
torch.load(weights_only=True)). Nothing is pickled; loading needs scmlab installed (pip requirement `scmlab`).
"""

import mlflow.models
import numpy as np
from mlflow.pyfunc import PythonModel


class EMASampler(PythonModel):
    """noise (N, *data_shape) float32, standard normal -> samples (N, *data_shape) in data space (images in [-1, 1],
    vectors in original units), with the kind's default steps (2 consistency steps; 18 Heun steps for diffusion).
    Class-conditional models get labels 0, 1, ..., K-1, 0, ... as `scmlab sample` gives them."""

    def load_context(self, context) -> None:
        from scmlab.config import Config
        from scmlab.train import checkpoint
        from scmlab.train.samples import ema_model

        ckpt = checkpoint.load(context.artifacts["checkpoint"])
        self.config, self.manifest = Config.from_dict(ckpt["config"]), ckpt["manifest"]
        self.net = ema_model(ckpt)

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        import torch

        from scmlab.train.samples import class_labels, sample_data

        noise = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        labels = class_labels(noise.shape[0], int(self.manifest.get("num_classes", 0)))
        return sample_data(self.net, self.config, self.manifest, noise, class_labels=labels,
                           generator=torch.Generator().manual_seed(0)).numpy()


mlflow.models.set_model(EMASampler())
