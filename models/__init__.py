"""recur's pure core: the model, its per-user state and step, training and evaluation.

Nothing here imports faust, kafka, pyarrow-at-import-time or prometheus_client.
"""
