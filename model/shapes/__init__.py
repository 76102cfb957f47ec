"""Command namespace kept for ``python -m model.shapes.clip_pretrain``; the shapes world lives in
``model.training.shapes``."""
