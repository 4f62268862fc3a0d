"""Data preparation: from a folder of videos to a training-ready ``.precomputed/`` dataset.

``dataset_file`` (CSV / JSON / JSONL tables), ``buckets`` (resolution buckets and the frame transform), ``process``
(captions, video / audio / reference latents, decoding), ``scenes`` (scene cuts and splitting), ``edges`` (Canny
edge references for IC-LoRA), ``captions`` (caption clean-ups and automatic captioning). The command lines are in
``tools/``.
"""
