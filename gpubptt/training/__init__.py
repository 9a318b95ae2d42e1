"""The training application on top of the model: ``loop`` (the training loop and its history), ``optim``
(optimizers and schedules), ``data`` (text corpora and batches), ``sample`` (generation), ``run`` (run settings),
``record`` (the training record a checkpoint carries: ``save_checkpoint``, ``load_checkpoint``) and the
checkpoint file format (``checkpoint``, with its header validation in ``checkpoint_meta``: the model's state
beside a record it stores without reading, and no training code). Import the submodules themselves: this
package re-exports nothing.
"""
