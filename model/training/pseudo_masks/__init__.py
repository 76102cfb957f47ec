"""Training-data stage 3: label-free salient-object pseudo-masks, one per retrieved image (reference §5.4).

- ``features``: the feature extractors the vote runs on (colour/texture, CLIP patches, DINO, MoCo), the
  ``FeatureExtractor`` protocol they follow and ``build_extractors`` (extractors by name).
- ``clustering``: spectral clustering of one feature grid into candidate segments, the long-mask filter and the
  vote; ``salient_mask`` runs them for one image.
- ``shards``: the stage itself (``generate_pseudo_masks``, resumable) and its on-disk shard format
  (``load_pseudo_masks``).
- ``command``: ``python -m model.pseudo_mask`` (argument parsing and ``main``).

The IoU the vote uses (``pairwise_iou``) lives with the library's other mask IoUs in ``model.mask_iou``.

Importing the package is cheap: nothing is imported from the submodules here.
"""
