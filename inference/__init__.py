"""The inference seam: a model version, loaded once per process, scores batches of users.

    model = load_model(bundle, top_n=20)
    scored = model.score(range(0, 1000))  # a range of user codes, or an array of them
    scored.user_ids, scored.playlist_ids, scored.payloads, scored.cold_user_ids

Every engine that runs a nightly run (the local process pool today) calls only this: it
loads a model in each of its processes with :func:`load_model` (or, when an experiment runs,
the champion and the challenger with :func:`load_arms`) and hands it batches. What
kind of model a bundle holds is in its metadata (``model.kind``; the built-in ranker by
default); each kind is a :class:`ModelVersion` subclass named in :data:`MODEL_KINDS`.

Importing this package imports neither torch nor a model kind: :func:`load_model` does, in
the process that scores.
"""

from inference.arms import Arms, load_arms
from inference.base import BatchCounts, ModelVersion, ScoredBatch, Users
from inference.loading import MODEL_KINDS, load_model

__all__ = [
    "MODEL_KINDS",
    "Arms",
    "BatchCounts",
    "ModelVersion",
    "ScoredBatch",
    "Users",
    "load_arms",
    "load_model",
]
