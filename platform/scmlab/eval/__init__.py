"""Sample quality: metrics, their feature networks, cached reference statistics, and evaluation of checkpoints,
sample files and training runs, composed as generate -> features -> statistics -> metric.

- math: `frechet` (Gaussian statistics, Frechet distance), `kid`, `prdc`, `distances` (energy, sliced W2);
- features: `inception` (Inception-v3 2015-12-05, for fid / kid), `classifier` (the dataset's own CNN, for fd /
  prdc / cls_acc), `features` (extractors and what a set of samples gives them);
- `reference`: the features of a dataset split, cached next to its shards; `metrics`: which metric needs what;
- `generate`: samples shared out over ranks, or from a file; `suite`: one evaluation setup, scoring samplers;
- `evaluate`: `scmlab evaluate`; `training`: the evaluation hook of the training loop.
"""


class EvalError(ValueError):
    """Samples or a checkpoint that cannot be scored as asked; the message names the file, key or option."""
