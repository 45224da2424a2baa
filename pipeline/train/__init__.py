"""Self-supervised pretraining (MoCo-v2, DINO, MAE, data2vec) on the store, and linear probing.

Modules: :mod:`~pipeline.train.engine` (the training loop), :mod:`~pipeline.train.methods`,
:mod:`~pipeline.train.backbones` (timm), :mod:`~pipeline.train.augment` (view recipes),
:mod:`~pipeline.train.export` (safetensors weights), :mod:`~pipeline.train.probe` (linear
probe) and :mod:`~pipeline.train.cli` (``ssl4eo pretrain`` / ``ssl4eo probe``). Nothing heavy is
imported here, so ``ssl4eo --help`` stays fast.
"""
