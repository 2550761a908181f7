"""Self-supervised pretraining (``dinotune pretrain``): DINOv2's recipe on unlabelled images."""
