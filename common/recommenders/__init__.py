"""Recommenders behind one interface (fit on TrainData, score users over the whole catalogue).

Classic baselines live here as plain numpy/scipy code; learned models (two-tower, GraphSAGE) and profiles
plug in through the same ``Recommender`` protocol so the evaluation harness treats every one alike.
"""
from common.recommenders.base import Recommender, top_k

__all__ = ["Recommender", "top_k"]
