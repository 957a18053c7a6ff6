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


def test_sdxl_bigg_pooled_and_penultimate_equal_open_clip(one_thread):
    """SDXL reads the whole tower: the projected pooled end token (open_clip's encode_text) and layer -2
    as it is, without the final LayerNorm (open_clip's second-to-last block's output)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    model = openclip_text_model()
    tower = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}
    clip = CLIPTextModelWithProjection(CLIPTextConfig(**convert_openclip.clip_config(tower, drop_last=False))).eval()
    weights = convert_openclip.to_transformers(tower, drop_last=False, projection=True)
    clip.load_state_dict({clip_name(k, clip): v for k, v in weights.items()}, strict=True)
    tokens = open_clip.tokenize(PROMPTS)
    caught = []
    hook = model.transformer.resblocks[-2].register_forward_hook(lambda module, args, out: caught.append(out))
    with torch.no_grad():
        pooled = model.encode_text(tokens)
        hook.remove()
        out = clip(input_ids=tokens, output_hidden_states=True)
    assert pooled.shape == (3, 32) and pooled.std() > 0.1
    torch.testing.assert_close(out.text_embeds, pooled, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.hidden_states[-2], caught[0], atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no text_projection"):
        convert_openclip.to_transformers({k: v for k, v in tower.items() if k != "text_projection"}, projection=True)
