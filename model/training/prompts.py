"""Prompt templates for retrieving images by concept (reference §5.1): plain data.

``PROMPT_TEMPLATES`` is the 85-template list the official code copied from DenseCLIP (Zhou et al., "Extract
Free Dense Labels from CLIP"): CLIP's 80 ImageNet templates (Radford et al., in the order of their zero-shot
notebook) followed by five "in the scene" templates. Each holds one ``{}`` where the concept name goes.
"""

from __future__ import annotations

from collections.abc import Sequence

PROMPT_TEMPLATES: tuple[str, ...] = (
    # CLIP's 80 ImageNet templates
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
    # DenseCLIP's five additions
    "there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
    "this is the {} in the scene.", "this is one {} in the scene.",
)


def fill_templates(concept: str, templates: Sequence[str] = PROMPT_TEMPLATES) -> list[str]:
    """The prompts for one concept: each template with ``{}`` replaced by ``concept``.

    Raises ``ValueError`` for an empty template list or a template without exactly one ``{}``.
    """
    if not templates:
        raise ValueError("at least one prompt template is needed")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"prompt templates must hold exactly one '{{}}': {bad[:3]}")
    # str.replace rather than str.format: concept names may contain braces.
    return [t.replace("{}", concept) for t in templates]


__all__ = ["PROMPT_TEMPLATES", "fill_templates"]
