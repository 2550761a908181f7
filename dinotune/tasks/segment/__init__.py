"""Semantic segmentation: linear and FPN decoders on DINOv2 patch features, confusion-matrix
mIoU, sliding-window inference, corruption robustness.

Contracts shared by the files of this package:

Source: ``SegmentationSource`` (``data.py``) lists ``(image path, mask path or None)`` pairs plus
``class_names`` (``K`` names, label order), ``ignore_index`` (255), and how a mask file's values
map to labels (``mask_kind``: ``"index"`` = values are labels (VOC palette PNGs, generic folders),
``"ade20k"`` = value 0 is ignore and ``v`` -> ``v - 1``, ``"coco"`` = rasterised from polygons,
``"colour"`` = a colour per class, looked up in the source's ``colours`` table (``colours.py``);
a colour the table lacks is ``ignore_index``).

Training item: ``{"image": 3 x S x S float (normalised), "mask": S x S int64 (labels 0..K-1 or
ignore_index), "index": int}`` after random scale, crop (padding: image 0, mask ignore) and flip.

Evaluation item: ``{"image": 3 x H' x W' float, "mask": H x W int64 (ORIGINAL resolution),
"index": int}`` where the image is resized so its short side is ``S`` (long side rounded to a
multiple of the backbone's patch size ``p``) for whole-image inference, or kept at full resolution
for sliding windows. ``segmentation_collate`` pads images of a batch to a common size (multiples
of ``p``) and keeps the masks as a list, with the unpadded sizes in ``"sizes"``.

Model: ``.backbone`` (DinoBackbone) + ``.head`` (the decoder); ``forward(images B x 3 x H x W) ->
logits B x K x h x w`` at the decoder's own resolution (H/p for linear, finer for fpn); the
criterion (``criterion.py``) and evaluation upsample logits (bilinear) to the label size.
"""
