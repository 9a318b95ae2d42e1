"""The training application on top of the model: ``loop`` (the training loop and its history), ``optim``
(optimizers and schedules), ``data`` (text corpora and batches), ``sample`` (generation), ``run`` (run settings),
and the checkpoint file format (``checkpoint``, with its header validation in ``checkpoint_meta``). Import the
submodules themselves: this package re-exports nothing.
"""
