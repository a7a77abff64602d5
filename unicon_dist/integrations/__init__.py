"""Adapters between fitted UniCon models and other libraries.

Each adapter is a submodule that imports its library at the top, so it is imported only
when used: ``import unicon_dist`` loads none of them, and none of those libraries is a
dependency of the package.

- :mod:`unicon_dist.integrations.sentence_transformers`: a UniCon head as the last module
  of a ``sentence_transformers.SentenceTransformer`` (:func:`append_head`), saved and
  reloaded with the model.
"""
