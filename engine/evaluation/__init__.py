"""Evaluation apart from the training run: features of a loader's images split over ranks and a
target's mAP and CMC (``targets``), the Market-1501 protocol's metrics computed in chunks
(``metrics``), k-reciprocal re-ranking (``rerank``) and a checkpoint's features on any images
(``features``, the inference API the tools use)."""
