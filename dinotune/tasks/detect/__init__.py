"""Object detection: a DETR-style DINOv2 detector (multi-scale deformable decoder, Hungarian
matching, COCO evaluation), a Faster R-CNN head and the single-object "simple" / "improved"
detectors (one class and one box per image from the CLS token), behind one interface
(``detectors.py``); data in COCO JSON (``coco.py``), YOLO (``yolo.py``) or Pascal VOC XML
(``voc.py``), all read into one ``DetectionSource``.

Contracts shared by the files of this package:

Dataset item: ``(image, target)`` with ``image`` a ``3 x S x S`` normalised float tensor (the
original image resized so its longer side is ``S`` and zero-padded at the right / bottom to
``S x S``; ``S`` a multiple of the backbone's patch size) and ``target`` a dict:

- ``boxes``: ``N x 4`` float, ``cxcywh`` normalised by ``S`` (so in [0, 1] on the padded canvas);
  crowd regions and degenerate boxes are NOT in here.
- ``labels``: ``N`` int64, contiguous class indices ``0..K-1``.
- ``image_id``: int, the original COCO image id (YOLO and VOC images get ids 1..M in file order).
- ``orig_size``: ``(height, width)`` int64 tensor of the original image.
- ``scale``: float, canvas pixels per original pixel (``S / max(h, w)`` without augmentation).

Batch (``collate``): ``{"images": B x 3 x S x S, "targets": list of B target dicts}``.

DETR model output: ``{"pred_logits": B x Q x K (raw, sigmoid-focal), "pred_boxes": B x Q x 4
(sigmoid cxcywh on the canvas), "aux_outputs": [dict(pred_logits, pred_boxes) per earlier decoder
layer]}``.

Category ids: datasets carry ``categories`` (list of ``{"id", "name"}`` in contiguous order), so
``label -> category_id`` and back are both one lookup; results written for COCO carry the original
``category_id``.
"""
