"""ldm.models.convert_openclip: an OpenCLIP text tower in transformers' CLIPTextModel gives what open_clip's
own model gives, token for token, at its last layer and (SD 2.x) its penultimate one."""
import pytest
import torch
from sd_layouts import openclip_text_model, openclip_tokens

from ldm.models import convert_openclip
from ldm.models.text import clip_name

open_clip = pytest.importorskip("open_clip")
PROMPTS = ["a red cube on a blue floor", "", "a photo of a corgi, " * 30]   # empty and truncated rows too


@pytest.mark.parametrize("drop_last", [False, True])
def test_tower_in_transformers_equals_open_clip(drop_last, one_thread):
    from transformers import CLIPTextConfig, CLIPTextModel
    model = openclip_text_model()
    tower = convert_openclip.text_tower({f"cond_stage_model.model.{k}": v for k, v in model.state_dict().items()},
                                        "cond_stage_model.model.")
    assert not any(k.startswith("visual.") for k in tower)
    config = convert_openclip.clip_config(tower, drop_last=drop_last)
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["intermediate_size"]) == \
        (3 - drop_last, 2, 512)
    clip = CLIPTextModel(CLIPTextConfig(**config)).eval()
    weights = convert_openclip.to_transformers(tower, drop_last=drop_last)
    assert all(k.startswith("text_model.") for k in weights)               # the names files carry
    clip.load_state_dict({clip_name(k, clip): v for k, v in weights.items()}, strict=True)
    with torch.no_grad():
        ours = clip(input_ids=open_clip.tokenize(PROMPTS)).last_hidden_state
    reference = openclip_tokens(model, PROMPTS, penultimate=drop_last)
    assert reference.std() > 0.1
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-5)


def test_other_towers_are_refused_by_name():
    tower = {k: v for k, v in openclip_text_model(layers=1).state_dict().items() if not k.startswith("visual.")}
    with pytest.raises(ValueError, match=r"unexpected weights \['transformer.resblocks.0.attn.gate.weight'\]"):
        convert_openclip.to_transformers({**tower, "transformer.resblocks.0.attn.gate.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="lack .*token_embedding.weight"):
        convert_openclip.clip_config({"ln_final.weight": torch.ones(4)})
