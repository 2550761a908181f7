"""Instance segmentation: one mask per object. Built on the detection task (``dinotune.tasks.detect``:
its readers, DETR-style decoder, matcher, COCO evaluation and records), which is the one sibling
this package may import (``tests/test_architecture.py``: ``BUILDS_ON``).

Contracts shared by the files of this package (beyond detection's, see ``tasks/detect/__init__.py``):

Source (``sources.py``): ``InstanceSource``, a ``DetectionSource`` whose ``segmentations`` maps an
annotation id (``Annotation.id``) to its COCO ``segmentation`` in ORIGINAL image pixels: a polygon
list ``[[x0, y0, x1, y1, ...], ...]`` or an RLE dict ``{"size": [h, w], "counts": str | list}``.
Every training annotation (``source.targets(image_id)``) has one; crowd regions keep theirs in
``coco_gt()`` (pycocotools ignores them in evaluation, as it does for boxes).

Dataset item (``data.py``): detection's ``(image, target)`` plus ``target["masks"]``: ``N x S x S``
uint8 {0, 1} on the padded canvas, row ``i`` the object of ``boxes[i]`` / ``labels[i]`` (masks move
with the image and boxes through every augmentation and the resize / pad). Batch
(``instance_collate``): ``{"images": B x 3 x S x S, "targets": [...]}``.

Model output (``model.py``): detection's ``pred_logits`` / ``pred_boxes`` plus ``pred_masks``
``B x Q x Hm x Wm`` mask logits on a grid covering the whole ``S x S`` canvas (``Hm = Wm = S /
mask stride``); every ``aux_outputs`` entry has the three keys too.

Post-processing: the tensor part (``postprocess.MaskPostProcess.dense``, also the exported graph)
gives per image the top ``k`` of ``queries x classes``: ``scores`` ``B x k``, ``labels`` ``B x k``,
``boxes`` ``B x k x 4`` xyxy original pixels, ``masks`` ``B x k x Hm x Wm`` float32 logits. The rest
is numpy (``masks.py``), the same for the PyTorch path and the torch-free runtime: logits ->
bilinear to the canvas -> the image's part of the canvas -> bilinear to the original size -> logit
> 0 -> a boolean mask -> COCO RLE (``{"size": [h, w], "counts": str}``).
"""
