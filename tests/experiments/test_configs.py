"""The shapes-world experiment configs: each states only its changes ("extends") and resolves to exactly the full
config the ladder ran (before they were written as changes), and each loads as a training config / CLIP recipe."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from model.training.config import load_config
from model.training.config_files import read_config
from model.training.shapes.clip_recipe import ClipRecipe

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "shapes" / "configs"

# SHA-256 of each full config as the ladder ran it (model/configs/ladder/*.json before issue 21, canonical JSON:
# sorted keys, no "description"). The experiments extend the shipped recipes, so a change to model/configs/shapes.json
# or shapes_clip.json changes what they resolve to: this test then fails, and whoever changed the recipe decides
# whether the experiment should follow (update the pin) or keep the old value (state it in the experiment).
AS_RUN = {
    "r0_base": "18719bc93bc3a70b6b70941f6807176532260bb5fc8717c1038b70aecef18737",
    "r0_grad": "a22e55319fe2cc09a50150782505b9c768d399fcc172a1f31bad035b1a01e1b0",
    "r0_sine": "d0c0deeaef25bd1234d0da0fd08cb3daac1f61c0a515bcdcd270718aa9a01b20",
    "r0_head": "fceaaa7e31e4cb3f69362a6dbf5557956bb9dfd8c75af57e149f419589a7a8c4",
    "r1_64px_20min": "d2987397ce93b698254f6b17253da37fed3377cd4248e0904f5e82b6f29f249d",
    "r1_128px_20min": "27dabafb768ae984f3b1d8d39da771992b081ede31ebbedc61196176acf5e464",
    "r2_oracle": "a44aba747e9d2fa4bf42bc25954db6cf84b145623bcc8409b5a3b5374b98cab4",
    "r3_grad": "a498205268cf0481118fd8d78e94ed79182a61091d30cd062d3460fe7c3ac435",
    "r3_no_copy_paste": "dd4d792bcb8cfc7cc0c7191a731100145992189139dfeae5e34494097eb689d6",
    "r3_seed1": "277fc611f3bcb3495f678ebdf6c30adcb03d58c6dfb2726f0280f77436a6a2e3",
}


def _canonical_sha(config: dict) -> str:
    config = {k: v for k, v in config.items() if k != "description"}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def test_every_experiment_config_is_pinned():
    assert sorted(p.stem for p in CONFIGS.glob("*.json")) == sorted(AS_RUN)


@pytest.mark.parametrize("name", sorted(AS_RUN))
def test_experiment_config_resolves_to_the_full_config_it_replaced(name):
    path = CONFIGS / f"{name}.json"
    raw = json.loads(path.read_text())
    assert "extends" in raw, "an experiment states its base and only what it changes"
    resolved = read_config(path)
    assert _canonical_sha(resolved) == AS_RUN[name], json.dumps(resolved, indent=1, sort_keys=True)
    # and it is small: the changes, not a copy (the full configs were 98-111 lines each)
    assert len(path.read_text().splitlines()) < 60


@pytest.mark.parametrize("name", sorted(AS_RUN))
def test_experiment_config_loads(name):
    path = CONFIGS / f"{name}.json"
    if "model_config" in read_config(path):
        recipe = ClipRecipe.load(path)
        assert recipe.minutes == 20.0 and recipe.steps is None
    else:
        cfg = load_config(path)
        assert cfg.out_dir.startswith("runs/")
